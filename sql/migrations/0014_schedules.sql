-- compatible-with: 1
-- Periodic jobs: schedules live in pgqueue.schedules, declared in code (`@app.periodic`)
-- or added at run time. Every worker fires the ticks that are due; no leader is needed,
-- and each tick fires once however many workers run:
--
-- * A worker reads a due schedule, works out its ticks in Python (cron expressions are
--   parsed by the `cronsim` library, not by SQL), and calls pgqueue.fire_schedule with
--   the next_run_at it read. The function advances the schedule only if next_run_at is
--   still that value (compare-and-set), and enqueues the ticks' jobs in the same
--   statement: a worker that lost the race enqueues nothing.
-- * Each tick's job also carries a unique key, 'cron:<schedule>:<tick>', held for twice
--   the schedule's period: a schedule removed and added again in that time cannot fire
--   the same tick twice either.
--
-- next_run_at null means "plan from now": a new or changed schedule, or one resumed
-- after a pause (ticks missed while paused are not run).

create table pgqueue.schedules (
    name text primary key constraint schedules_name check (name ~ '^[A-Za-z0-9_.:-]{1,200}$'),
    task text not null,
    args jsonb not null default '{}',
    -- the job's options; null takes the task's registration, as pgqueue.enqueue does
    queue text,
    priority integer,
    max_attempts integer,
    timeout_seconds double precision,
    -- 5-field cron, an alias (@hourly, @daily, ...), or '@every <n>s|m|h|d'
    cron text not null,
    timezone text not null default 'UTC',
    -- what a worker does with ticks it finds missed (all workers were down):
    --   latest: run the latest missed tick once; skip: run none more than a minute late;
    --   all: run each, at most max_catch_up of them (the latest)
    missed text not null default 'latest' constraint schedules_missed check (missed in ('latest', 'skip', 'all')),
    max_catch_up integer not null default 100 constraint schedules_max_catch_up check (max_catch_up between 1 and 10000),
    paused boolean not null default false,
    next_run_at timestamptz,
    last_run_at timestamptz,
    last_job_id bigint,
    -- 'code' when declared by an app (its workers update it at start), 'runtime' when added
    source text not null default 'runtime' constraint schedules_source check (source in ('code', 'runtime')),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index schedules_due on pgqueue.schedules (next_run_at) where not paused;
comment on table pgqueue.schedules is
    'pgqueue periodic jobs: each due tick of an unpaused schedule is enqueued once, by whichever worker sees it first.';

-- Declare or update a schedule. A changed expression or time zone is planned afresh from
-- now; otherwise the schedule keeps its place, its pause and its history.
create function pgqueue.declare_schedule(
    p_name text,
    p_task text,
    p_cron text,
    p_timezone text default 'UTC',
    p_args jsonb default '{}',
    p_queue text default null,
    p_priority integer default null,
    p_max_attempts integer default null,
    p_timeout_seconds double precision default null,
    p_missed text default 'latest',
    p_max_catch_up integer default 100,
    p_source text default 'runtime'
) returns boolean
language sql volatile as $$
    insert into pgqueue.schedules as s (name, task, args, queue, priority, max_attempts, timeout_seconds,
                                        cron, timezone, missed, max_catch_up, source)
    values (p_name, p_task, coalesce(p_args, '{}'), p_queue, p_priority, p_max_attempts, p_timeout_seconds,
            p_cron, p_timezone, p_missed, p_max_catch_up, p_source)
    on conflict (name) do update
    set task = excluded.task, args = excluded.args, queue = excluded.queue, priority = excluded.priority,
        max_attempts = excluded.max_attempts, timeout_seconds = excluded.timeout_seconds,
        cron = excluded.cron, timezone = excluded.timezone, missed = excluded.missed,
        max_catch_up = excluded.max_catch_up, source = excluded.source,
        next_run_at = case when (s.cron, s.timezone) is distinct from (excluded.cron, excluded.timezone)
                           then null else s.next_run_at end,
        updated_at = now()
    returning (xmax = 0)  -- true when it was new
$$;

-- Fire the ticks p_ticks of schedule p_name and move it on to p_next, if its next_run_at
-- is still p_expected (else another worker did it: nothing happens). Returns the job of
-- each tick (a tick whose key was already taken answers with the holder's id).
create function pgqueue.fire_schedule(
    p_name text,
    p_expected timestamptz,
    p_ticks timestamptz[],
    p_next timestamptz,
    p_key_window interval default interval '1 day'
) returns table (tick timestamptz, job_id bigint, duplicate boolean)
language plpgsql volatile as $$
#variable_conflict use_column
declare
    v_schedule pgqueue.schedules%rowtype;
    v_tick timestamptz;
    v_job bigint;
    v_duplicate boolean;
begin
    update pgqueue.schedules s
    set next_run_at = p_next,
        last_run_at = coalesce((select max(t) from unnest(p_ticks) t), s.last_run_at),
        updated_at = now()
    where s.name = p_name and not s.paused and s.next_run_at is not distinct from p_expected
    returning s.* into v_schedule;
    if not found then
        return;
    end if;
    foreach v_tick in array coalesce(p_ticks, '{}') loop
        select u.id, u.duplicate into v_job, v_duplicate
        from pgqueue.enqueue_unique(
            v_schedule.task,
            'cron:' || v_schedule.name || ':' || to_char(v_tick at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            v_schedule.args,
            queue => v_schedule.queue,
            priority => v_schedule.priority,
            max_attempts => v_schedule.max_attempts,
            timeout_seconds => v_schedule.timeout_seconds,
            unique_for => p_key_window) u;
        update pgqueue.schedules set last_job_id = v_job where name = p_name;
        tick := v_tick;
        job_id := v_job;
        duplicate := v_duplicate;
        return next;
    end loop;
end
$$;

create function pgqueue.pause_schedule(p_name text) returns boolean
language sql volatile as $$
    update pgqueue.schedules set paused = true, updated_at = now() where name = p_name returning true
$$;

-- Resumed schedules are planned afresh from now: what was missed while paused is not run.
create function pgqueue.resume_schedule(p_name text) returns boolean
language sql volatile as $$
    update pgqueue.schedules set paused = false, next_run_at = null, updated_at = now()
    where name = p_name returning true
$$;

create function pgqueue.remove_schedule(p_name text) returns boolean
language sql volatile as $$
    delete from pgqueue.schedules where name = p_name returning true
$$;
