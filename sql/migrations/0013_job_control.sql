-- compatible-with: 1
-- Job control: cancel a running job, report progress, snooze.
--
-- * pgqueue.cancel(id) cancels a queued job at once. A running job gets a cancel request
--   (a row in pgqueue.cancel_requests) and a NOTIFY on pgqueue_cancel carrying its id:
--   the worker running it stops it (cancels an async handler, kills a process child,
--   raises the flag a thread handler reads), and records the attempt as 'cancelled'. A
--   worker that does not LISTEN learns of it from its next heartbeat.
-- * Progress lives in pgqueue.job_progress, one row per job, written by the worker in the
--   same round trips as its outcomes: the tables of jobs are not touched, so neither a
--   claim nor a completion pays for it.
-- * A handler may snooze: its job goes back to the queue for later without spending an
--   attempt and without an error.
--
-- Requests and progress of jobs that no longer exist are forgotten by the maintenance
-- leader (pgqueue.prune_job_control).

create table pgqueue.cancel_requests (
    job_id bigint primary key,
    requested_at timestamptz not null default now()
);
comment on table pgqueue.cancel_requests is
    'pgqueue: running jobs asked to stop; the worker running each records it as cancelled.';

create table pgqueue.job_progress (
    job_id bigint primary key,
    -- {"current", "total", "percent", "message", "stage"}: what the handler last reported
    progress jsonb not null,
    updated_at timestamptz not null default now()
) with (fillfactor = 70);
comment on table pgqueue.job_progress is
    'pgqueue: the last progress each job''s handler reported (current, total, percent, message, stage).';

-- Cancel job p_id: 'cancelled' when it was queued (it is now), 'cancelling' when it runs
-- (its worker is told), else 'already ' and the state it ended in ('already succeeded',
-- 'already dead', 'already cancelled'); null when there is no such job.
create function pgqueue.cancel(p_id bigint, p_now timestamptz default null)
returns text
language plpgsql volatile as $$
declare
    v_state pgqueue.job_state;
begin
    -- the row lock settles a race with its claim or its completion: we see what won
    select j.state into v_state from pgqueue.active_jobs j where j.id = p_id for update;
    if v_state = 'queued' then
        perform pgqueue.cancel_job(p_id, p_now);
        return 'cancelled';
    elsif v_state = 'running' then
        insert into pgqueue.cancel_requests (job_id, requested_at)
        values (p_id, coalesce(p_now, now()))
        on conflict (job_id) do nothing;
        perform pg_notify('pgqueue_cancel', p_id::text);
        return 'cancelling';
    end if;
    select j.state into v_state from pgqueue.finished_jobs j where j.id = p_id;
    return 'already ' || v_state::text;
end
$$;

-- Progress of the jobs a worker runs; a job that is no longer running there (finished,
-- lost its lease) keeps what it had. Returns how many were written.
create function pgqueue.report_progress(
    p_worker text,
    p_ids bigint[],
    p_attempts integer[],
    p_progress jsonb[],
    p_now timestamptz default null
) returns integer
language plpgsql volatile set plan_cache_mode = force_custom_plan as $$
declare
    v_written integer;
begin
    insert into pgqueue.job_progress as p (job_id, progress, updated_at)
    select r.id, r.progress, coalesce(p_now, now())
    from unnest(p_ids, p_attempts, p_progress) as r(id, attempt, progress)
    join pgqueue.active_jobs j on j.id = r.id and j.attempt = r.attempt
    where j.state = 'running' and j.worker = p_worker
    on conflict (job_id) do update set progress = excluded.progress, updated_at = excluded.updated_at;
    get diagnostics v_written = row_count;
    return v_written;
end
$$;

-- 0009's heartbeat, also saying which of the jobs have a cancel request.
create function pgqueue.heartbeat_v3(
    p_worker text,
    p_ids bigint[],
    p_attempts integer[],
    p_lease_seconds double precision,
    p_now timestamptz default null
) returns table (id bigint, attempt integer, extended boolean, cancel boolean)
language sql volatile as $$
    select h.id, h.attempt, h.extended, exists (select from pgqueue.cancel_requests c where c.job_id = h.id)
    from pgqueue.heartbeat_v2(p_worker, p_ids, p_attempts, p_lease_seconds, p_now) h
$$;

-- The leader's sweep: requests whose job stopped running (its worker recorded something
-- else first, or it was released to the queue: a queued job is cancelled now), and
-- progress of jobs pruned from the history.
create function pgqueue.prune_job_control(p_limit integer default 1000)
returns table (cancelled bigint, forgotten bigint)
language plpgsql volatile as $$
declare
    v_cancelled bigint := 0;
    v_forgotten bigint := 0;
    v_id bigint;
begin
    for v_id in
        select c.job_id from pgqueue.cancel_requests c
        where not exists (select from pgqueue.active_jobs j where j.id = c.job_id and j.state = 'running')
        limit p_limit
    loop
        if pgqueue.cancel_job(v_id) then
            v_cancelled := v_cancelled + 1;
            delete from pgqueue.cancel_requests where job_id = v_id;
        elsif not exists (select from pgqueue.active_jobs j where j.id = v_id) then
            delete from pgqueue.cancel_requests where job_id = v_id;  -- it ended
        end if;
        -- else a worker claimed it meanwhile: the request stays, for its heartbeat
    end loop;
    with gone as (
        delete from pgqueue.job_progress p
        where p.job_id in (
            select g.job_id from pgqueue.job_progress g
            where not exists (select from pgqueue.jobs j where j.id = g.job_id)
            limit p_limit)
        returning 1
    )
    select count(*) into v_forgotten from gone;
    return query select v_cancelled, v_forgotten;
end
$$;

-- 0009's completions, with two outcomes more:
--   'cancelled': the attempt was stopped by a cancel request; the job ends cancelled.
--   'snoozed': the handler postponed its job by p_retry_in seconds; the attempt is not
--   counted and leaves no error (the job may snooze for as long as it likes).
-- A failure (or a release, a snooze, a hand-back) of a job with a cancel request ends it
-- cancelled instead of requeueing it.
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
-- planned for the actual arrays on every call (see 0003); requeues are not enqueues (0012)
language plpgsql volatile set plan_cache_mode = force_custom_plan set pgqueue.requeue = 'on' as $$
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
                when d.outcome = 'cancelled' then 'cancelled'
                -- anything else with a cancel request ends cancelled (the worker released
                -- or snoozed it before it saw the request); a success never pays for the probe
                when exists (select from pgqueue.cancel_requests c where c.job_id = d.id) then 'cancelled'
                when d.outcome in ('released', 'snoozed') then 'queued'
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
            case when d.outcome in ('released', 'deferred', 'snoozed') then d.attempt - 1 else d.attempt end
                as attempt,
            d.max_attempts,
            case
                when d.next_state <> 'queued' then d.run_at
                when d.outcome = 'released' then v_now
                when d.outcome in ('deferred', 'retry', 'snoozed') then
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
                when d.next_state in ('dead', 'cancelled') then v_now
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
            -- one entry per attempt that did not succeed (a success is the row itself; a
            -- snooze or a hand-back is not an attempt)
            case when d.outcome in ('deferred', 'succeeded', 'snoozed') then d.history
                else d.history || jsonb_build_array(jsonb_build_object(
                    'attempt', d.attempt, 'worker', p_worker,
                    'outcome', case when d.next_state = 'cancelled' then 'cancelled' else d.outcome end,
                    'started_at', coalesce(d.began, d.started_at), 'ended_at', coalesce(d.ended, v_now),
                    'seconds', extract(epoch from coalesce(d.ended, v_now) - coalesce(d.began, d.started_at))))
            end as history
        from decided d
    ),
    finished as (
        insert into pgqueue.finished_jobs select * from settled s where s.state <> 'queued'
        returning finished_jobs.id, finished_jobs.state, finished_jobs.run_at
    ),
    -- a request outlives no job (a redrive must not meet it again)
    forgotten as (
        delete from pgqueue.cancel_requests c using settled s where c.job_id = s.id and s.state <> 'queued'
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

-- 0009's redrive, which also forgets a cancel request the job may have left (0012 ran it
-- with pgqueue.requeue on, as here).
create or replace function pgqueue.retry_job(p_id bigint, p_now timestamptz default null)
returns boolean
language plpgsql volatile set pgqueue.requeue = 'on' as $$
declare
    v_now timestamptz := coalesce(p_now, now());
    v_queue text;
begin
    delete from pgqueue.cancel_requests where job_id = p_id;
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
