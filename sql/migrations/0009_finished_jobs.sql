-- compatible-with: 1
-- Finished jobs leave the hot table. Claims, heartbeats, completions and vacuum work on
-- pgqueue.active_jobs (queued and running jobs: as many as the backlog, however long the
-- history); a job that reaches a final state (succeeded, dead, cancelled) moves, in the
-- statement that finishes it, to pgqueue.finished_jobs, which is only ever appended to
-- and pruned. With history in the hot table, every vacuum of it walked indexes holding
-- all of history, and drain and claim latency beside 10 million finished jobs fell to
-- 0.85x and 1.7x of an empty table; pruning deleted from the table claims read.
--
-- pgqueue.jobs is now a view of both tables: every query that read the table reads the
-- view unchanged (one job by id, history by state, plain SQL over everything). INSERT,
-- UPDATE, DELETE and COPY on the view still work, through a trigger that puts each row
-- in the table its state belongs to, so producers and workers of earlier releases go
-- on working during a rolling upgrade (the exception: `pgqueue dead --retry-all` of an
-- earlier release, which locks rows of the view, fails until it is upgraded). pgqueue
-- itself writes the two tables.
--
-- The upgrade moves the unfinished jobs, not the history: the old table, with its
-- finished-jobs and dead-letter indexes, becomes pgqueue.finished_jobs, and the queued
-- and running jobs move to the new table. It reads the history once, to check that it
-- holds only finished jobs (seconds per 10 million rows), under a lock that holds off
-- workers and producers meanwhile.

-- The queued and running jobs, found by their own indexes, move to the new table.
alter table pgqueue.jobs rename to finished_jobs;

create table pgqueue.active_jobs (
    like pgqueue.finished_jobs including defaults including constraints including storage
);
-- ids stay one sequence across both tables (a job keeps its id when it finishes)
alter table pgqueue.active_jobs
    alter column id set default nextval('pgqueue.jobs_id_seq'),
    add constraint active_jobs_pkey primary key (id),
    add constraint active_jobs_unfinished check (state in ('queued', 'running'));
comment on table pgqueue.active_jobs is
    'pgqueue jobs not finished yet: queued (ready or scheduled for later) and running.';

insert into pgqueue.active_jobs select * from pgqueue.finished_jobs where state = 'queued';
insert into pgqueue.active_jobs select * from pgqueue.finished_jobs where state = 'running';
delete from pgqueue.finished_jobs where state in ('queued', 'running');

-- The claim, running and retrying indexes now index the hot table alone.
drop index pgqueue.jobs_claim;
drop index pgqueue.jobs_running;
drop index pgqueue.jobs_retrying;
create index jobs_claim on pgqueue.active_jobs (queue, priority desc, run_at, id) where state = 'queued';
create index jobs_running on pgqueue.active_jobs (worker) where state = 'running';
create index jobs_retrying on pgqueue.active_jobs (id) where state = 'queued' and attempt > 0;

-- The hot table keeps 0008's room for HOT heartbeats and its eager autovacuum; it is
-- small now, so a vacuum of it is quick. The history table is appended to and pruned:
-- full pages, and a vacuum after pruning has removed 5% of it.
alter table pgqueue.active_jobs set (
    fillfactor = 80,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_threshold = 5000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);
alter table pgqueue.finished_jobs reset (
    fillfactor, autovacuum_vacuum_threshold, autovacuum_vacuum_insert_threshold,
    autovacuum_vacuum_insert_scale_factor, autovacuum_analyze_threshold
);
alter table pgqueue.finished_jobs set (
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);
alter index pgqueue.jobs_pkey rename to finished_jobs_pkey;
alter table pgqueue.finished_jobs
    add constraint finished_jobs_final check (state in ('succeeded', 'dead', 'cancelled'));
comment on table pgqueue.finished_jobs is
    'pgqueue jobs in a final state (succeeded, dead, cancelled), kept for their retention (pgqueue.retention).';

-- New jobs wake the workers of their queue (0001's trigger, now on the hot table).
drop trigger jobs_notify on pgqueue.finished_jobs;
create trigger jobs_notify after insert on pgqueue.active_jobs
    referencing new table as new_jobs
    for each statement execute function pgqueue.notify_queues();

-- Every job, active or finished: what users and earlier releases query and write.
-- A query by state reads one table (the planner proves the other's check constraint
-- false); a query by id probes both primary keys.
create view pgqueue.jobs as
select * from pgqueue.active_jobs
union all
select * from pgqueue.finished_jobs;
comment on view pgqueue.jobs is
    'pgqueue jobs: pgqueue.active_jobs and pgqueue.finished_jobs; writable (a trigger routes each row by state).';

-- The view's defaults are the hot table's (so `insert into pgqueue.jobs (task) ...`
-- fills in the rest as before).
do $$
declare
    v_column record;
begin
    for v_column in
        select a.attname, pg_get_expr(d.adbin, d.adrelid) as expression
        from pg_attrdef d
        join pg_attribute a on a.attrelid = d.adrelid and a.attnum = d.adnum
        where d.adrelid = 'pgqueue.active_jobs'::regclass
    loop
        execute format('alter view pgqueue.jobs alter column %I set default %s',
                       v_column.attname, v_column.expression);
    end loop;
end
$$;

-- Writes to the view, one row at a time: each row goes to the table of its state (an
-- update that changes the table moves the row). For operators and earlier releases;
-- pgqueue's own statements write the tables in bulk.
create function pgqueue.write_jobs_view() returns trigger
language plpgsql as $$
begin
    if tg_op in ('UPDATE', 'DELETE') then
        delete from pgqueue.active_jobs where id = old.id;
        if not found then
            delete from pgqueue.finished_jobs where id = old.id;
        end if;
        if tg_op = 'DELETE' then
            return old;
        end if;
    end if;
    if new.state in ('queued', 'running') then
        insert into pgqueue.active_jobs select (new).*;
    else
        insert into pgqueue.finished_jobs select (new).*;
    end if;
    return new;
end
$$;

create trigger jobs_write instead of insert or update or delete on pgqueue.jobs
    for each row execute function pgqueue.write_jobs_view();

-- The functions below are the latest versions (0001-0008) with the table they read
-- or write changed; those that finish a job, or bring one back, move it.

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
    -- may not be deployed yet), with a notice (0005)
    select * into v_task from pgqueue.tasks t where t.name = enqueue.task;
    if not found and enqueue.task is not null then
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
    insert into pgqueue.active_jobs as j (
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

-- 0008's claim: priority levels one at a time, each found by one probe.
create or replace function pgqueue.claim_jobs(
    p_worker text,
    p_queues text[],
    p_limit integer,
    p_lease_seconds double precision,
    p_now timestamptz default null
) returns table (
    id bigint, task text, args jsonb, queue text, priority smallint, attempt integer,
    max_attempts integer, timeout_seconds double precision, run_at timestamptz, created_at timestamptz
)
language plpgsql volatile as $$
#variable_conflict use_column
declare
    v_now timestamptz := coalesce(p_now, now());
    v_left integer := p_limit;
    v_level smallint;
    v_claimed integer;
begin
    p_queues := array(select distinct q from unnest(p_queues) as q);
    for v_level in
        with recursive levels(queue, priority, due) as (
            select q.name, first.priority, first.run_at
            from unnest(p_queues) as q(name)
            cross join lateral (select j.priority, j.run_at from pgqueue.active_jobs j
                                where j.state = 'queued' and j.queue = q.name
                                order by j.priority desc, j.run_at limit 1) as first
            union all
            select l.queue, next.priority, next.run_at
            from levels l
            cross join lateral (select j.priority, j.run_at from pgqueue.active_jobs j
                                where j.state = 'queued' and j.queue = l.queue and j.priority < l.priority
                                order by j.priority desc, j.run_at limit 1) as next
        )
        select distinct l.priority from levels l where l.due <= v_now order by 1 desc
    loop
        return query
        with candidates as (
            select c.id, c.run_at
            from unnest(p_queues) as q(name)
            cross join lateral (
                select j.id, j.run_at from pgqueue.active_jobs j
                where j.state = 'queued' and j.queue = q.name and j.priority = v_level
                  and j.run_at <= v_now
                order by j.run_at, j.id
                limit v_left
                for update skip locked
            ) c
        ),
        claimable as (
            select c.id from candidates c order by c.run_at, c.id limit v_left
        )
        update pgqueue.active_jobs j
        set state = 'running', attempt = j.attempt + 1, worker = p_worker,
            started_at = v_now, lease_expires_at = v_now + make_interval(secs => p_lease_seconds)
        from claimable c
        where j.id = c.id
        returning j.id, j.task, j.args, j.queue, j.priority, j.attempt, j.max_attempts,
            j.timeout_seconds, j.run_at, j.created_at;
        get diagnostics v_claimed = row_count;
        v_left := v_left - v_claimed;
        exit when v_left <= 0;
    end loop;
end
$$;

-- Outcomes (0003's rules, unchanged): every job whose outcome this is leaves the hot
-- table in one DELETE (its row lock is the only one taken), and goes back in, queued
-- for its retry, or to the history, in its final state. A job requeued for now wakes
-- the workers of its queue through the hot table's insert trigger.
create or replace function pgqueue.complete_jobs_v2(
    p_worker text,
    p_ids bigint[],
    p_attempts integer[],
    p_outcomes text[],
    p_results jsonb[],
    p_errors jsonb[],
    p_retry_in double precision[],
    p_started_at timestamptz[],
    p_ended_at timestamptz[],
    p_now timestamptz default null
) returns table (id bigint, state pgqueue.job_state, run_at timestamptz)
-- planned for the actual arrays on every call (see 0003)
language plpgsql volatile set plan_cache_mode = force_custom_plan as $$
#variable_conflict use_column
declare
    v_now timestamptz := coalesce(p_now, now());
begin
    return query
    with done as (
        delete from pgqueue.active_jobs j
        using unnest(p_ids, p_attempts, p_outcomes, p_results, p_errors, p_retry_in, p_started_at, p_ended_at)
            as o(job_id, job_attempt, outcome, outcome_result, error, retry_in, began, ended)
        where j.id = o.job_id and j.state = 'running' and j.attempt = o.job_attempt and j.worker = p_worker
        returning j.*, o.outcome, o.outcome_result, o.error, o.retry_in, o.began, o.ended
    ),
    decided as (
        select d.*, case
                when d.outcome = 'succeeded' then 'succeeded'::pgqueue.job_state
                when d.outcome = 'released' then 'queued'
                when d.outcome = 'deferred' then case when pgqueue.deferral_expired(d.errors, d.error, v_now)
                    then 'dead'::pgqueue.job_state else 'queued' end
                when d.outcome = 'fatal' or d.attempt >= d.max_attempts then 'dead'
                else 'queued'
            end as next_state
        from done d
    ),
    -- the columns in the tables' order
    settled as (
        select d.id, d.queue, d.task, d.args, d.priority, d.next_state as state,
            case when d.outcome in ('released', 'deferred') then d.attempt - 1 else d.attempt end as attempt,
            d.max_attempts,
            case
                when d.next_state <> 'queued' then d.run_at
                when d.outcome = 'released' then v_now
                when d.outcome in ('deferred', 'retry') then
                    v_now + make_interval(secs => least(greatest(d.retry_in, 0), 315360000))
                else v_now + make_interval(secs => pgqueue.backoff_seconds(
                    d.backoff, d.backoff_base_seconds, d.backoff_max_seconds, d.backoff_jitter, d.attempt, d.id))
            end as run_at,
            d.timeout_seconds, d.backoff, d.backoff_base_seconds, d.backoff_max_seconds, d.backoff_jitter,
            case when d.next_state <> 'queued' then d.worker end as worker,
            null::timestamptz as lease_expires_at,
            d.created_at,
            -- when the handler really began (not the claim: a process job may wait for a CPU)
            coalesce(d.began, d.started_at) as started_at,
            case
                -- the handler's own end, on the same clock as started_at
                when d.next_state = 'succeeded' then coalesce(d.ended, v_now)
                when d.next_state = 'dead' then v_now
            end as finished_at,
            case when d.outcome = 'succeeded' then d.outcome_result else d.result end as result,
            case
                when d.error is null then d.errors
                when d.outcome <> 'deferred' then d.errors || jsonb_build_array(d.error ||
                    jsonb_build_object('attempt', d.attempt, 'at', v_now, 'worker', p_worker))
                -- another hand-back in a row (of either kind): it replaces the last entry
                when d.errors -> -1 ? 'first_at' then (d.errors - -1) ||
                    jsonb_build_array(d.error || jsonb_build_object(
                        'attempt', d.attempt, 'at', v_now, 'worker', p_worker,
                        'first_at', d.errors -> -1 -> 'first_at',
                        'count', (d.errors -> -1 ->> 'count')::integer + 1))
                else d.errors || jsonb_build_array(d.error || jsonb_build_object(
                    'attempt', d.attempt, 'at', v_now, 'worker', p_worker, 'first_at', v_now, 'count', 1))
            end as errors,
            -- one entry per attempt that did not succeed (a success is the row itself)
            case when d.outcome in ('deferred', 'succeeded') then d.history
                else d.history || jsonb_build_array(jsonb_build_object(
                    'attempt', d.attempt, 'worker', p_worker, 'outcome', d.outcome,
                    'started_at', coalesce(d.began, d.started_at), 'ended_at', coalesce(d.ended, v_now),
                    'seconds', extract(epoch from coalesce(d.ended, v_now) - coalesce(d.began, d.started_at))))
            end as history
        from decided d
    ),
    finished as (
        insert into pgqueue.finished_jobs select * from settled s where s.state <> 'queued'
        returning finished_jobs.id, finished_jobs.state, finished_jobs.run_at
    ),
    requeued as (
        insert into pgqueue.active_jobs select * from settled s where s.state = 'queued'
        returning active_jobs.id, active_jobs.state, active_jobs.run_at
    )
    select f.id, f.state, f.run_at from finished f
    union all
    select r.id, r.state, r.run_at from requeued r;
end
$$;

create or replace function pgqueue.heartbeat(
    p_worker text,
    p_ids bigint[],
    p_lease_seconds double precision,
    p_now timestamptz default null
) returns setof bigint
language plpgsql volatile set plan_cache_mode = force_custom_plan as $$
begin
    return query
    update pgqueue.active_jobs j
    set lease_expires_at = coalesce(p_now, now()) + make_interval(secs => p_lease_seconds)
    where j.id = any(p_ids) and j.state = 'running' and j.worker = p_worker
    returning j.id;
end
$$;

create or replace function pgqueue.heartbeat_v2(
    p_worker text,
    p_ids bigint[],
    p_attempts integer[],
    p_lease_seconds double precision,
    p_now timestamptz default null
) returns table (id bigint, attempt integer, extended boolean)
language plpgsql volatile set plan_cache_mode = force_custom_plan as $$
#variable_conflict use_column
begin
    return query
    with mine as (
        select j.id, j.attempt
        from pgqueue.active_jobs j
        join unnest(p_ids, p_attempts) as held(id, attempt) on held.id = j.id and held.attempt = j.attempt
        where j.state = 'running' and j.worker = p_worker
    ),
    locked as (
        select j.id from pgqueue.active_jobs j
        where j.id in (select m.id from mine m) and j.state = 'running' and j.worker = p_worker
        order by j.id
        for update skip locked
    ),
    updated as (
        update pgqueue.active_jobs j
        set lease_expires_at = coalesce(p_now, now()) + make_interval(secs => p_lease_seconds)
        from locked l
        where j.id = l.id
        returning j.id
    )
    select m.id, m.attempt, true from mine m where m.id in (select u.id from updated u)
    union all
    select m.id, m.attempt, false from mine m where m.id not in (select u.id from updated u);
end
$$;

-- 0002's rescue: requeued with backoff, or dead-lettered (last attempt, or a poison job).
create or replace function pgqueue.rescue_expired_jobs(
    p_now timestamptz default null,
    p_limit integer default 1000,
    p_poison_after integer default 3
)
returns table (id bigint, state pgqueue.job_state)
language plpgsql volatile as $$
#variable_conflict use_column
declare
    v_now timestamptz := coalesce(p_now, now());
begin
    return query
    with expired as (
        select j.id,
               -- expired leases in a row at the end of its history, this one included
               1 + (
                   select count(*) from jsonb_array_elements(j.errors) with ordinality as e(entry, n)
                   where e.n > coalesce((
                       select max(o.n) from jsonb_array_elements(j.errors) with ordinality as o(entry, n)
                       where o.entry ->> 'kind' is distinct from 'lease_expired'), 0)
               ) as expiries
        from pgqueue.active_jobs j
        where j.state = 'running' and j.lease_expires_at < v_now
        order by j.lease_expires_at
        limit p_limit
        for update skip locked
    ),
    done as (
        delete from pgqueue.active_jobs j using expired e where j.id = e.id
        returning j.*, e.expiries, (j.attempt >= j.max_attempts or e.expiries >= p_poison_after) as dies
    ),
    -- the columns in the tables' order
    settled as (
        select d.id, d.queue, d.task, d.args, d.priority,
            case when d.dies then 'dead'::pgqueue.job_state else 'queued' end as state,
            d.attempt, d.max_attempts,
            v_now + make_interval(secs => pgqueue.backoff_seconds(
                d.backoff, d.backoff_base_seconds, d.backoff_max_seconds, d.backoff_jitter, d.attempt, d.id)) as run_at,
            d.timeout_seconds, d.backoff, d.backoff_base_seconds, d.backoff_max_seconds, d.backoff_jitter,
            null::text as worker, null::timestamptz as lease_expires_at, d.created_at, d.started_at,
            case when d.dies then v_now end as finished_at,
            d.result,
            d.errors || jsonb_build_array(jsonb_build_object(
                'attempt', d.attempt, 'at', v_now, 'worker', d.worker, 'kind', 'lease_expired',
                'error', case when d.expiries >= p_poison_after and d.attempt < d.max_attempts
                    then format('lease expired at %s: worker %s stopped heartbeating; dead-lettered '
                                'because its last %s attempts all ended this way (it kills or hangs '
                                'its worker)', d.lease_expires_at, d.worker, d.expiries)
                    else format('lease expired at %s: worker %s stopped heartbeating (crashed or lost '
                                'its connection)', d.lease_expires_at, d.worker) end,
                'traceback', null)) as errors,
            -- lost with its worker: it started at its claim as far as the database knows
            d.history || jsonb_build_array(jsonb_build_object(
                'attempt', d.attempt, 'worker', d.worker, 'outcome', 'lease_expired',
                'started_at', d.started_at, 'ended_at', null, 'seconds', null)) as history
        from done d
    ),
    finished as (
        insert into pgqueue.finished_jobs select * from settled s where s.state = 'dead'
        returning finished_jobs.id, finished_jobs.state
    ),
    requeued as (
        insert into pgqueue.active_jobs select * from settled s where s.state = 'queued'
        returning active_jobs.id, active_jobs.state, active_jobs.queue
    ),
    -- requeued with a backoff, so not due yet: wake the workers all the same (0002)
    woken as (
        select pg_notify('pgqueue_jobs', q.queue) from (select distinct r.queue from requeued r) q
    )
    select f.id, f.state from finished f
    union all
    select r.id, r.state from requeued r cross join (select count(*) from woken) w;
end
$$;

-- A redrive (0006) moves the job back from the history to the hot table.
create or replace function pgqueue.retry_job(p_id bigint, p_now timestamptz default null)
returns boolean
language plpgsql volatile as $$
declare
    v_now timestamptz := coalesce(p_now, now());
    v_queue text;
begin
    with moved as (
        delete from pgqueue.finished_jobs j
        where j.id = p_id and j.state in ('dead', 'cancelled')
        returning j.*
    )
    insert into pgqueue.active_jobs
    select m.id, m.queue, m.task, m.args, m.priority, 'queued', 0, m.max_attempts, v_now,
        m.timeout_seconds, m.backoff, m.backoff_base_seconds, m.backoff_max_seconds, m.backoff_jitter,
        null, null, m.created_at, m.started_at, null, m.result,
        m.errors || jsonb_build_array(jsonb_build_object(
            'attempt', 0, 'at', v_now, 'worker', null, 'kind', 'redriven',
            'error', format('redriven from %s after attempt %s', m.state, m.attempt),
            'traceback', null)),
        m.history
    from moved m
    returning queue into v_queue;
    if v_queue is null then
        return false;
    end if;
    perform pg_notify('pgqueue_jobs', v_queue);
    return true;
end
$$;

create or replace function pgqueue.release_jobs(p_worker text, p_keep bigint[], p_now timestamptz default null)
returns setof bigint
language plpgsql volatile set plan_cache_mode = force_custom_plan as $$
begin
    return query
    with released as (
        update pgqueue.active_jobs j
        set state = 'queued', attempt = greatest(j.attempt - 1, 0), run_at = coalesce(p_now, now()),
            worker = null, lease_expires_at = null
        where j.state = 'running' and j.worker = p_worker and j.id <> all(p_keep)
        returning j.id, j.queue
    ),
    woken as (
        select pg_notify('pgqueue_jobs', q.queue) from (select distinct r.queue from released r) q
    )
    select r.id from released r cross join (select count(*) from woken) w;
end
$$;

-- Cancelling a job that has not started moves it to the history.
create or replace function pgqueue.cancel_job(p_id bigint, p_now timestamptz default null)
returns boolean
language sql volatile as $$
    with moved as (
        delete from pgqueue.active_jobs j
        where j.id = p_id and j.state = 'queued'
        returning j.*
    ),
    cancelled as (
        insert into pgqueue.finished_jobs
        select m.id, m.queue, m.task, m.args, m.priority, 'cancelled', m.attempt, m.max_attempts, m.run_at,
            m.timeout_seconds, m.backoff, m.backoff_base_seconds, m.backoff_max_seconds, m.backoff_jitter,
            m.worker, null, m.created_at, m.started_at, coalesce(p_now, now()), m.result, m.errors, m.history
        from moved m
        returning 1
    )
    select exists (select from cancelled)
$$;

-- 0008's pruning, of the history table: it never touches a row a claim reads.
create or replace function pgqueue.prune_jobs(
    p_limit integer default 1000,
    p_dry_run boolean default false,
    p_now timestamptz default null
) returns table (state pgqueue.job_state, queue text, jobs bigint)
language plpgsql volatile as $$
#variable_conflict use_column
declare
    v_now timestamptz := coalesce(p_now, now());
    v_policy record;
    v_count bigint;
begin
    for v_policy in
        select r.state, r.queue, r.keep,
               array(select o.queue from pgqueue.retention o
                     where o.state = r.state and o.queue <> '*') as overridden
        from pgqueue.retention r
        where r.keep is not null
        order by r.state, r.queue
    loop
        if p_dry_run then
            select count(*) into v_count from pgqueue.finished_jobs j
            where j.state = v_policy.state and j.finished_at is not null
              and j.finished_at < v_now - v_policy.keep
              and (case when v_policy.queue = '*' then j.queue <> all(v_policy.overridden)
                        else j.queue = v_policy.queue end);
        else
            with doomed as (
                select j.id from pgqueue.finished_jobs j
                where j.state = v_policy.state and j.finished_at is not null
                  and j.finished_at < v_now - v_policy.keep
                  and (case when v_policy.queue = '*' then j.queue <> all(v_policy.overridden)
                            else j.queue = v_policy.queue end)
                order by j.finished_at
                limit p_limit
                for update skip locked
            ),
            gone as (
                delete from pgqueue.finished_jobs j using doomed d where j.id = d.id returning 1
            )
            select count(*) into v_count from gone;
        end if;
        if v_count > 0 then
            state := v_policy.state;
            queue := v_policy.queue;
            jobs := v_count;
            return next;
        end if;
    end loop;
end
$$;

-- A queue's own retention can be removed: its jobs follow the state's default again.
create function pgqueue.clear_retention(p_state text, p_queue text)
returns boolean
language sql volatile as $$
    with gone as (
        delete from pgqueue.retention r
        where r.state::text = p_state and r.queue = p_queue and r.queue <> '*'
        returning 1
    )
    select exists (select from gone)
$$;

-- The views and functions of 0003 and 0007, reading the table that holds what they count.
create or replace view pgqueue.attempts as
select j.id as job_id, j.task, j.queue,
       (a ->> 'attempt')::integer as attempt,
       a ->> 'worker' as worker,
       a ->> 'outcome' as outcome,
       (a ->> 'started_at')::timestamptz as started_at,
       (a ->> 'ended_at')::timestamptz as ended_at,
       (a ->> 'seconds')::double precision as seconds
from pgqueue.jobs j
cross join lateral jsonb_array_elements(j.history) as a
union all
select j.id, j.task, j.queue, j.attempt, j.worker, 'succeeded',
       j.started_at, j.finished_at, extract(epoch from j.finished_at - j.started_at)::double precision
from pgqueue.finished_jobs j
where j.state = 'succeeded';

create or replace view pgqueue.workers as
select w.worker, w.host, w.pid, w.queues, w.concurrency, w.version,
       case when w.stopped_at is not null then 'stopped'
            when w.expires_at > now() then 'live'
            else 'lost' end as status,
       w.started_at, w.last_seen_at, w.stopped_at,
       (select count(*) from pgqueue.active_jobs j
        where j.state = 'running' and j.worker = w.worker) as jobs_in_hand
from pgqueue.worker_sessions w;

create or replace view pgqueue.queue_stats as
select queue, state, jobs, oldest_due,
       extract(epoch from now() - oldest_due)::double precision as oldest_age_seconds
from (
    select j.queue, s.state, s.jobs, s.oldest_due
    from (select queue,
                 count(*) filter (where run_at <= now()) as ready,
                 count(*) filter (where run_at > now()) as scheduled,
                 min(run_at) filter (where run_at <= now()) as oldest_due
          from pgqueue.active_jobs where state = 'queued' group by queue) j
    cross join lateral (values ('ready', j.ready, j.oldest_due),
                               ('scheduled', j.scheduled, null::timestamptz)) as s(state, jobs, oldest_due)
    where s.jobs > 0
    union all
    select queue, 'running', count(*), null from pgqueue.active_jobs where state = 'running' group by queue
    union all
    select queue, 'dead', count(*), null from pgqueue.finished_jobs where state = 'dead' group by queue
) as counts;

create or replace function pgqueue.task_stats_since(p_since timestamptz)
returns table (
    task text,
    succeeded bigint,
    dead bigint,
    cancelled bigint,
    failed_attempts bigint,
    run_p50_seconds double precision,
    run_p95_seconds double precision,
    run_mean_seconds double precision,
    wait_mean_seconds double precision
)
language sql stable as $$
    select j.task,
           count(*) filter (where j.state = 'succeeded'),
           count(*) filter (where j.state = 'dead'),
           count(*) filter (where j.state = 'cancelled'),
           coalesce(sum((select count(*) from jsonb_array_elements(j.history) as h(entry)
                         where h.entry ->> 'outcome' in ('failed', 'retry', 'fatal', 'lease_expired'))), 0)::bigint,
           percentile_cont(0.5) within group (order by extract(epoch from j.finished_at - j.started_at))
               filter (where j.state = 'succeeded'),
           percentile_cont(0.95) within group (order by extract(epoch from j.finished_at - j.started_at))
               filter (where j.state = 'succeeded'),
           avg(extract(epoch from j.finished_at - j.started_at)::double precision)
               filter (where j.state = 'succeeded'),
           avg(extract(epoch from j.started_at - j.run_at)::double precision)
               filter (where j.state = 'succeeded')
    from pgqueue.finished_jobs j
    where j.state in ('succeeded', 'dead', 'cancelled') and j.finished_at >= p_since
      and j.finished_at is not null
    group by j.task
$$;

create or replace view pgqueue.throughput as
select date_trunc('minute', finished_at) as minute, queue, state, count(*) as jobs
from pgqueue.finished_jobs
where state in ('succeeded', 'dead', 'cancelled') and finished_at >= now() - interval '1 hour'
  and finished_at is not null
group by 1, 2, 3;

create or replace function pgqueue.failures_since(p_since timestamptz)
returns table (
    job_id bigint,
    task text,
    queue text,
    state pgqueue.job_state,
    attempt integer,
    failed_at timestamptz,
    worker text,
    kind text,
    error text
)
language sql stable as $$
    select j.id, j.task, j.queue, j.state, (e.entry ->> 'attempt')::integer,
           (e.entry ->> 'at')::timestamptz, e.entry ->> 'worker', e.entry ->> 'kind', e.entry ->> 'error'
    from (
        select * from pgqueue.finished_jobs
        where state in ('succeeded', 'dead', 'cancelled') and finished_at >= p_since
          and finished_at is not null
        union all
        select * from pgqueue.active_jobs where state = 'queued' and attempt > 0
        union all
        select * from pgqueue.active_jobs where state = 'running' and attempt > 1
    ) as j
    cross join lateral jsonb_array_elements(j.errors) as e(entry)
    where (e.entry ->> 'at')::timestamptz >= p_since
      and e.entry ->> 'kind' not in ('redriven', 'unknown_task', 'bad_arguments', 'released')
$$;
