-- compatible-with: 1
-- Rolling deploys and shared queues: a worker that claims a job it cannot run (its task
-- is not registered there, or the stored arguments do not fit its function) hands it
-- back as 'deferred' instead of dead-lettering it: the attempt does not count, the job
-- waits p_retry_in seconds so that a worker that knows it can take it, and its errors
-- say why. A job handed back this way for longer than the `give_up_after` seconds its
-- error entry carries (counted from the first hand-back in a row) is dead-lettered.
--
-- Times tell the truth: the worker reports when each handler began and ended, so
-- `started_at` is the handler's start (not the claim), `finished_at` of a success is the
-- handler's end, and `history` (0002) keeps every other attempt that ran; the pgqueue.attempts
-- view joins both, one row per attempt, for run-time percentiles per task in plain SQL.
-- complete_jobs_v2 takes the two extra arrays;
-- complete_jobs (0001's signature, still called by older workers) forwards to it.

-- Has a job handed back as 'deferred' (above) waited longer than the `give_up_after`
-- seconds its error entry carries, counted from the first hand-back in a row? Hand-backs
-- in a row (unknown task or unfit arguments alike: in a deploy, old and new workers give
-- different reasons) share one error entry, the last, which keeps the first one's time
-- and their count; so this reads one entry, and a job offered every few seconds for an
-- hour does not pile up hundreds of them. Called only for deferred outcomes.
create function pgqueue.deferral_expired(p_errors jsonb, p_error jsonb, p_now timestamptz)
returns boolean
language sql immutable as $$
    select p_now - make_interval(secs => (p_error ->> 'give_up_after')::double precision) >
        coalesce((p_errors -> -1 ->> 'first_at')::timestamptz, p_now)
$$;

create function pgqueue.complete_jobs_v2(
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
-- planned for the actual arrays on every call: the generic plan that PL/pgSQL switches to
-- after five calls joined every running job against every outcome (2,000 outcomes:
-- 5.1 s generic, 61 ms custom, measured)
language plpgsql volatile set plan_cache_mode = force_custom_plan as $$
#variable_conflict use_column
declare
    v_now timestamptz := coalesce(p_now, now());
begin
    -- One UPDATE straight from the unnested arrays: the row lock it takes is the only
    -- one (a separate SELECT ... FOR UPDATE pass cost more than the update itself).
    return query
    with updated as (
        update pgqueue.jobs j
        set state = case
                when o.outcome = 'succeeded' then 'succeeded'::pgqueue.job_state
                when o.outcome = 'released' then 'queued'
                when o.outcome = 'deferred' then case when pgqueue.deferral_expired(j.errors, o.error, v_now) then 'dead'::pgqueue.job_state else 'queued' end
                when o.outcome = 'fatal' or j.attempt >= j.max_attempts then 'dead'
                else 'queued'
            end,
            attempt = case when o.outcome in ('released', 'deferred') then j.attempt - 1 else j.attempt end,
            run_at = case
                when o.outcome = 'succeeded' or o.outcome = 'fatal' then j.run_at
                when o.outcome = 'released' then v_now
                when o.outcome = 'deferred' then case when pgqueue.deferral_expired(j.errors, o.error, v_now) then j.run_at
                    else v_now + make_interval(secs => least(greatest(o.retry_in, 0), 315360000)) end
                when j.attempt >= j.max_attempts then j.run_at
                when o.outcome = 'retry' then v_now + make_interval(secs => least(greatest(o.retry_in, 0), 315360000))
                else v_now + make_interval(secs => pgqueue.backoff_seconds(
                    j.backoff, j.backoff_base_seconds, j.backoff_max_seconds, j.backoff_jitter, j.attempt, j.id))
            end,
            finished_at = case
                -- the handler's own end, on the same clock as started_at
                when o.outcome = 'succeeded' then coalesce(o.ended_at, v_now)
                when o.outcome = 'deferred' then case when pgqueue.deferral_expired(j.errors, o.error, v_now) then v_now end
                when o.outcome = 'succeeded' or o.outcome = 'fatal' or
                     (o.outcome <> 'released' and j.attempt >= j.max_attempts) then v_now
            end,
            result = case when o.outcome = 'succeeded' then o.result else j.result end,
            -- when the handler really began (not when the job was claimed: a process job
            -- may wait for a free CPU), and one entry per attempt, successful ones too
            started_at = coalesce(o.started_at, j.started_at),
            history = case when o.outcome in ('deferred', 'succeeded') then j.history
                else j.history || jsonb_build_array(jsonb_build_object(
                'attempt', j.attempt, 'worker', p_worker, 'outcome', o.outcome,
                'started_at', coalesce(o.started_at, j.started_at), 'ended_at', coalesce(o.ended_at, v_now),
                'seconds', extract(epoch from coalesce(o.ended_at, v_now) - coalesce(o.started_at, j.started_at))))
                end,
            errors = case
                when o.error is null then j.errors
                when o.outcome <> 'deferred' then j.errors || jsonb_build_array(o.error ||
                    jsonb_build_object('attempt', j.attempt, 'at', v_now, 'worker', p_worker))
                -- another hand-back in a row (of either kind): it replaces the last entry
                when j.errors -> -1 ? 'first_at' then (j.errors - -1) ||
                    jsonb_build_array(o.error || jsonb_build_object(
                        'attempt', j.attempt, 'at', v_now, 'worker', p_worker,
                        'first_at', j.errors -> -1 -> 'first_at',
                        'count', (j.errors -> -1 ->> 'count')::integer + 1))
                else j.errors || jsonb_build_array(o.error || jsonb_build_object(
                    'attempt', j.attempt, 'at', v_now, 'worker', p_worker, 'first_at', v_now, 'count', 1))
            end,
            worker = case
                when o.outcome = 'deferred' then case when pgqueue.deferral_expired(j.errors, o.error, v_now) then j.worker end
                when o.outcome = 'succeeded' or o.outcome = 'fatal' or
                     (o.outcome <> 'released' and j.attempt >= j.max_attempts) then j.worker
            end,
            lease_expires_at = null
        from unnest(p_ids, p_attempts, p_outcomes, p_results, p_errors, p_retry_in, p_started_at, p_ended_at)
            as o(id, attempt, outcome, result, error, retry_in, started_at, ended_at)
        where j.id = o.id and j.state = 'running' and j.attempt = o.attempt and j.worker = p_worker
        returning j.id, j.state, j.run_at, j.queue
    ),
    woken as (
        select pg_notify('pgqueue_jobs', q.queue)
        from (select distinct u.queue from updated u where u.state = 'queued' and u.run_at <= v_now) q
    )
    -- joining the one-row count makes Postgres evaluate the notify CTE
    select u.id, u.state, u.run_at from updated u cross join (select count(*) from woken) w;
end
$$;

create or replace function pgqueue.complete_jobs(
    p_worker text,
    p_ids bigint[],
    p_attempts integer[],
    p_outcomes text[],
    p_results jsonb[],
    p_errors jsonb[],
    p_retry_in double precision[],
    p_now timestamptz default null
) returns table (id bigint, state pgqueue.job_state, run_at timestamptz)
language sql volatile as $$
    select * from pgqueue.complete_jobs_v2(
        p_worker, p_ids, p_attempts, p_outcomes, p_results, p_errors, p_retry_in, null, null, p_now)
$$;

-- One row per finished attempt: what run time percentiles, error rates and per-worker
-- questions are asked of, e.g.
--   select task, percentile_cont(0.95) within group (order by seconds)
--   from pgqueue.attempts where ended_at > now() - interval '1 hour' group by task;
create view pgqueue.attempts as
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
-- a success is the job's last attempt: its times are the row's own (kept out of the
-- history, so the hot path of a successful job builds no JSON)
select j.id, j.task, j.queue, j.attempt, j.worker, 'succeeded',
       j.started_at, j.finished_at, extract(epoch from j.finished_at - j.started_at)::double precision
from pgqueue.jobs j
where j.state = 'succeeded';
