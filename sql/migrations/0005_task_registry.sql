-- compatible-with: 1
-- The SQL enqueue answers every bad argument with one clear message (SQLSTATE 22023),
-- never a raw check-constraint violation, and refuses run times that are not real
-- ('infinity') or further than ten years away.
--
-- Enqueue by name knows the task: every worker records the tasks it serves (name, queue,
-- priority, attempts, timeout, retry policy) when it starts, and pgqueue.enqueue (SQL,
-- the CLI without --app, a producer-only App) applies those options to whatever the
-- caller did not say, instead of silent defaults.
create table pgqueue.tasks (
    name text primary key,
    queue text not null,
    priority smallint not null,
    max_attempts integer not null,
    timeout_seconds double precision,
    backoff pgqueue.backoff_kind not null,
    backoff_base_seconds double precision not null,
    backoff_max_seconds double precision not null,
    backoff_jitter real not null,
    registered_by text not null,
    registered_at timestamptz not null default now()
);

create or replace function pgqueue.enqueue(
    task text,
    args jsonb default '{}',
    queue text default null,
    priority integer default null,
    run_at timestamptz default null,
    delay interval default null,
    max_attempts integer default null,
    timeout_seconds double precision default null,
    backoff pgqueue.backoff_kind default null,
    backoff_base_seconds double precision default null,
    backoff_max_seconds double precision default null,
    backoff_jitter double precision default null
) returns bigint
language plpgsql volatile as $$
declare
    v_id bigint;
    v_task pgqueue.tasks%rowtype;
begin
    -- what the caller left out comes from the task as its workers registered it, then
    -- from pgqueue's defaults; a name no worker registered is enqueued all the same (it
    -- may not be deployed yet), with a warning
    select * into v_task from pgqueue.tasks t where t.name = enqueue.task;
    if not found and enqueue.task is not null then
        -- a notice, not a warning: a trigger enqueueing before the workers start would
        -- otherwise write one server log line per row
        raise notice 'pgqueue.enqueue: no worker has registered a task named % (yet): check the name', enqueue.task;
    end if;
    queue := coalesce(queue, v_task.queue, 'default');
    priority := coalesce(priority, v_task.priority, 0);
    max_attempts := coalesce(max_attempts, v_task.max_attempts, 10);
    timeout_seconds := coalesce(timeout_seconds, v_task.timeout_seconds);
    backoff := coalesce(backoff, v_task.backoff, 'exponential');
    backoff_base_seconds := coalesce(backoff_base_seconds, v_task.backoff_base_seconds, 1);
    backoff_max_seconds := coalesce(backoff_max_seconds, v_task.backoff_max_seconds, 3600);
    backoff_jitter := coalesce(backoff_jitter, v_task.backoff_jitter, 0.1);
    if delay is not null and delay < interval '0' then
        raise exception 'pgqueue.enqueue: delay must not be negative, got %', delay
            using errcode = '22023';
    end if;
    if delay is not null and delay > interval '10 years' then
        raise exception 'pgqueue.enqueue: delay is capped at 10 years, got %', delay
            using errcode = '22023';
    end if;
    if run_at is not null and delay is not null then
        raise exception 'pgqueue.enqueue: give run_at or delay, not both' using errcode = '22023';
    end if;
    if enqueue.queue is null or enqueue.queue !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$' then
        raise exception 'pgqueue.enqueue: queue names are 1-100 letters, digits, _ . : -, got %', enqueue.queue
            using errcode = '22023';
    end if;
    if enqueue.task is null or enqueue.task !~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$' then
        raise exception 'pgqueue.enqueue: task names are 1-200 letters, digits, _ . : -, got %', enqueue.task
            using errcode = '22023';
    end if;
    if enqueue.args is not null and jsonb_typeof(enqueue.args) <> 'object' then
        raise exception 'pgqueue.enqueue: args must be a JSON object (keyword arguments), got a JSON %',
            jsonb_typeof(enqueue.args) using errcode = '22023';
    end if;
    if run_at is not null and not isfinite(run_at) then
        raise exception 'pgqueue.enqueue: run_at must be a real time, got %', run_at using errcode = '22023';
    end if;
    if run_at is not null and run_at > now() + interval '10 years' then
        raise exception 'pgqueue.enqueue: run_at is capped at 10 years from now, got %', run_at
            using errcode = '22023';
    end if;
    if max_attempts is null or max_attempts < 1 then
        raise exception 'pgqueue.enqueue: max_attempts must be at least 1, got %', max_attempts
            using errcode = '22023';
    end if;
    if timeout_seconds is not null and not (timeout_seconds > 0 and timeout_seconds <= 315360000) then
        raise exception 'pgqueue.enqueue: timeout_seconds must be more than 0 and at most 10 years, got %',
            timeout_seconds using errcode = '22023';
    end if;
    if backoff is null then
        raise exception 'pgqueue.enqueue: backoff must be exponential, linear or fixed' using errcode = '22023';
    end if;
    if backoff_base_seconds is null or not (backoff_base_seconds between 0 and 315360000)
       or backoff_max_seconds is null or not (backoff_max_seconds between 0 and 315360000) then
        raise exception 'pgqueue.enqueue: backoff_base_seconds and backoff_max_seconds must be between 0 and 10 years, got % and %',
            backoff_base_seconds, backoff_max_seconds using errcode = '22023';
    end if;
    if backoff_jitter is null or not (backoff_jitter between 0 and 1) then
        raise exception 'pgqueue.enqueue: backoff_jitter must be between 0 and 1, got %', backoff_jitter
            using errcode = '22023';
    end if;
    if priority is null or priority not between -32768 and 32767 then
        raise exception 'pgqueue.enqueue: priority must be between -32768 and 32767, got %', priority
            using errcode = '22023';
    end if;
    insert into pgqueue.jobs as j (
        task, args, queue, priority, run_at, max_attempts, timeout_seconds,
        backoff, backoff_base_seconds, backoff_max_seconds, backoff_jitter
    ) values (
        enqueue.task, coalesce(enqueue.args, '{}'), enqueue.queue, enqueue.priority,
        coalesce(enqueue.run_at, now() + coalesce(enqueue.delay, interval '0')),
        enqueue.max_attempts, enqueue.timeout_seconds,
        enqueue.backoff, enqueue.backoff_base_seconds, enqueue.backoff_max_seconds, enqueue.backoff_jitter
    ) returning j.id into v_id;
    return v_id;
end
$$;
