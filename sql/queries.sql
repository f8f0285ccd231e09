-- Named queries the Python side runs. Each block starts with "-- name: NAME" and a
-- one-line description; pgqueue/sql.py splits the file into a dict at import.
-- Values are always bound parameters (%(name)s); identifiers never vary.

-- name: insert_job
-- Insert one job (the enqueue hot path: one statement, one round trip).
insert into pgqueue.active_jobs (
    task, args, queue, priority, run_at, max_attempts, timeout_seconds,
    backoff, backoff_base_seconds, backoff_max_seconds, backoff_jitter
) values (
    %(task)s, %(args)s::jsonb, %(queue)s, %(priority)s,
    coalesce(%(run_at)s::timestamptz, now()) + make_interval(secs => %(delay)s::double precision),
    %(max_attempts)s, %(timeout_seconds)s::double precision,
    %(backoff)s::pgqueue.backoff_kind, %(backoff_base_seconds)s::double precision,
    %(backoff_max_seconds)s::double precision, %(backoff_jitter)s::real
) returning id

-- name: reserve_ids
-- Reserve ids for a bulk COPY, so bulk enqueue can return them.
-- One row holding an array: a literal regclass (pg_get_serial_sequence() was resolved
-- once per row) and one array instead of 100,000 rows took 0.1 s instead of 0.6 s.
select array_agg(nextval('pgqueue.jobs_id_seq'::regclass)), now()
from generate_series(1, %(count)s)

-- name: copy_jobs
-- COPY target for bulk enqueue.
copy pgqueue.active_jobs (
    id, task, args, queue, priority, run_at, max_attempts, timeout_seconds,
    backoff, backoff_base_seconds, backoff_max_seconds, backoff_jitter
) from stdin

-- name: claim_jobs
-- Claim a batch of due jobs for this worker (FOR UPDATE SKIP LOCKED inside).
select id, task, args, queue, priority, attempt, max_attempts, timeout_seconds, run_at, created_at
from pgqueue.claim_jobs(%(worker)s, %(queues)s, %(limit)s, %(lease_seconds)s, %(now)s)

-- name: complete_jobs
-- Record a batch of outcomes in one statement, with when each handler began and ended.
-- Numbers travel in binary (%b): psycopg's text arrays check every element with a regular
-- expression, which cost about 1 µs per job per array (measured with cProfile).
select id, state, run_at from pgqueue.complete_jobs_v2(
    %(worker)s, %(ids)b::bigint[], %(attempts)b::integer[], %(outcomes)s, %(results)s::jsonb[],
    %(errors)s::jsonb[], %(retry_in)b::double precision[],
    (select array_agg(to_timestamp(t) order by n)
     from unnest(%(started_at)b::double precision[]) with ordinality as a(t, n)),
    (select array_agg(to_timestamp(t) order by n)
     from unnest(%(ended_at)b::double precision[]) with ordinality as a(t, n)),
    %(now)s)

-- name: heartbeat
-- Extend the leases of this worker's running jobs (skipping rows a completion is writing);
-- returns every id still this worker's, whether its lease was extended, and whether it
-- has a cancel request.
select id, attempt, extended, cancel
from pgqueue.heartbeat_v3(%(worker)s, %(ids)s, %(attempts)s, %(lease_seconds)s, %(now)s)

-- name: release_orphans
-- Hand back jobs this worker holds but does not run (after a claim whose reply was lost).
select pgqueue.release_jobs(%(worker)s, %(held)s::bigint[], %(now)s)

-- name: rescue_expired_jobs
-- Requeue (or dead-letter) up to %(limit)s jobs whose lease expired.
select id, state from pgqueue.rescue_expired_jobs(%(now)s, %(limit)s)

-- name: lead
-- Become or stay the leader of a maintenance duty; true while this worker leads.
select pgqueue.lead(%(duty)s, %(worker)s, %(seconds)s, %(now)s)

-- name: resign
-- Step down as leader of a duty (at shutdown).
select pgqueue.resign(%(duty)s, %(worker)s)

-- name: next_due_in
-- Seconds until the next queued job of these queues falls due (lets an idle worker sleep
-- exactly), null when none is queued. Database time, so worker clocks may drift.
select extract(epoch from min(run_at) - now())::double precision
from pgqueue.active_jobs where state = 'queued' and queue = any(%(queues)s)

-- name: get_job
-- One job by id, with its last reported progress.
select j.id, j.task, j.args, j.queue, j.priority, j.state, j.attempt, j.max_attempts, j.run_at,
       j.timeout_seconds, j.worker, j.lease_expires_at, j.created_at, j.started_at, j.finished_at,
       j.result, j.errors, j.history, p.progress
from pgqueue.jobs j left join pgqueue.job_progress p on p.job_id = j.id
where j.id = %(id)s

-- name: job_status
-- One job as a producer may read it (pgqueue.job_status): no arguments, no worker, no
-- history; in get_job's columns, the missing ones empty.
select s.id, s.task, '{}'::jsonb, s.queue, s.priority, s.state, s.attempt, s.max_attempts, s.run_at,
       null::double precision, null::text, null::timestamptz, s.created_at, s.started_at,
       s.finished_at, s.result, s.errors, '[]'::jsonb, s.progress
from pgqueue.job_status s
where s.id = %(id)s

-- name: cancel_job
-- Cancel a queued job.
select pgqueue.cancel_job(%(id)s)

-- name: cancel
-- Cancel a job: 'cancelled' (it was queued), 'cancelling' (it runs: its worker is told),
-- 'already <state>' when it had ended, or null when there is no such job.
select pgqueue.cancel(%(id)s)

-- name: capped_queues
-- Whether any of these queues has a limit that can cap a claim.
select exists (select from pgqueue.queues c where c.name = any(%(queues)s::text[])
               and (c.max_running is not null or c.max_per_worker is not null or c.rate_per_second is not null))

-- name: cancel_requested
-- Which of these running jobs have a cancel request (a worker that starts listening looks,
-- for those sent before it listened).
select job_id from pgqueue.cancel_requests where job_id = any(%(ids)s::bigint[])

-- name: report_progress
-- Store the last progress of jobs this worker runs.
select pgqueue.report_progress(%(worker)s, %(ids)s, %(attempts)s, %(progress)s::jsonb[], %(now)s)

-- name: prune_job_control
-- Forget cancel requests of jobs no longer running (cancelling those back in the queue)
-- and progress of jobs that no longer exist.
select cancelled, forgotten from pgqueue.prune_job_control(%(limit)s)

-- name: retry_job
-- Requeue a dead or cancelled job.
select pgqueue.retry_job(%(id)s)

-- name: job_state
-- State of one job, or nothing.
select state from pgqueue.jobs where id = %(id)s

-- name: status_counts
-- Jobs per queue and state (ready, scheduled, running, dead), from pgqueue.queue_stats.
select queue, state, jobs, oldest_due from pgqueue.queue_stats order by queue, state

-- name: status_recent
-- Over the last %(seconds)s seconds, in one pass over the jobs that finished then (the
-- finished-jobs index) and over those waiting for or running a retry: jobs finished,
-- successes, attempts that failed in the window, the successes' mean run time; and the
-- live workers now. (No percentiles: pgqueue.task_stats has them, at a sort's cost.)
with recent as (
    select j.state, j.started_at, j.finished_at, j.errors, true as finished
    from pgqueue.finished_jobs j
    where j.state in ('succeeded', 'dead', 'cancelled')
      and j.finished_at >= now() - make_interval(secs => %(seconds)s) and j.finished_at is not null
    union all
    select j.state, j.started_at, j.finished_at, j.errors, false
    from pgqueue.active_jobs j where j.state = 'queued' and j.attempt > 0
    union all
    select j.state, j.started_at, j.finished_at, j.errors, false
    from pgqueue.active_jobs j where j.state = 'running' and j.attempt > 1
)
select count(*) filter (where r.finished),
       count(*) filter (where r.finished and r.state = 'succeeded'),
       coalesce(sum((select count(*) from jsonb_array_elements(r.errors) as e(entry)
                     where (e.entry ->> 'at')::timestamptz >= now() - make_interval(secs => %(seconds)s)
                       and e.entry ->> 'kind' not in ('redriven', 'unknown_task', 'bad_arguments', 'released')))
                filter (where r.errors <> '[]'::jsonb), 0)::bigint,
       avg(extract(epoch from r.finished_at - r.started_at)::double precision)
           filter (where r.finished and r.state = 'succeeded'),
       (select count(*) from pgqueue.workers where status = 'live')
from recent r

-- name: dead_jobs
-- The dead letter, newest first (the finished-jobs index, read backwards).
select id, task, queue, attempt, finished_at, errors -> -1 ->> 'error' as last_error
from pgqueue.finished_jobs where state = 'dead' and finished_at is not null
order by finished_at desc, id desc
limit %(limit)s

-- name: retry_dead_batch
-- Redrive the next %(limit)s dead jobs after id %(after)s; returns how many were requeued
-- and the last id looked at. The caller pages on by id, so each job is looked at once
-- even when a running worker sends a requeued job straight back to the dead letter.
with batch as materialized (
    -- locked first, then redriven: a function in the locking query's own select list
    -- would update rows before they are locked, and the lock would then skip them
    select id from pgqueue.finished_jobs
    where state = 'dead' and id > %(after)s
    order by id
    limit %(limit)s
    for update skip locked
)
select count(*) filter (where pgqueue.retry_job(id)), max(id) from batch

-- name: recorded_attempts
-- Which of these attempts already have their outcome recorded by this worker (a call
-- whose reply was lost had committed): a success is the row itself, any other outcome
-- an entry in the job's history (not the one the rescue wrote when the lease ran out).
select o.id, case when j.attempt = o.attempt then j.state end, null::timestamptz
from unnest(%(ids)s::bigint[], %(attempts)s::integer[]) as o(id, attempt)
join pgqueue.jobs j on j.id = o.id
where (j.state = 'succeeded' and j.attempt = o.attempt and j.worker = %(worker)s::text)
   or exists (
       select from jsonb_array_elements(j.history) as h(entry)
       where h.entry @> jsonb_build_object('attempt', o.attempt, 'worker', %(worker)s::text)
         and h.entry ->> 'outcome' <> 'lease_expired')

-- name: worker_rights
-- Whether this role may do a worker's work (pgqueue_worker's rights), checked at its start.
-- has_table_privilege is true when any listed right is held: one call per right.
select has_table_privilege('pgqueue.active_jobs', 'UPDATE')
   and has_table_privilege('pgqueue.active_jobs', 'DELETE')
   and has_table_privilege('pgqueue.finished_jobs', 'INSERT')
   and has_table_privilege('pgqueue.worker_sessions', 'INSERT')
   and has_table_privilege('pgqueue.leaders', 'UPDATE')
   and has_table_privilege('pgqueue.tasks', 'INSERT'),
   current_user

-- name: grant_roles
-- Grant the three roles their rights in this database (creating them first when asked).
select pgqueue.grant_roles(%(create)s)

-- name: role_exists
-- Whether a role of this name exists (in the cluster).
select exists (select from pg_roles where rolname = %(role)s)

-- name: role_members
-- The roles among these that exist, each with the roles it is granted to.
select r.rolname, array_remove(array_agg(m.rolname order by m.rolname), null)
from pg_roles r
left join pg_auth_members a on a.roleid = r.oid
left join pg_roles m on m.oid = a.member
where r.rolname = any(%(roles)s::text[])
group by r.rolname

-- name: register_tasks
-- A worker records the tasks it serves when it starts (the last worker to start wins).
insert into pgqueue.tasks as t (
    name, queue, priority, max_attempts, timeout_seconds,
    backoff, backoff_base_seconds, backoff_max_seconds, backoff_jitter, registered_by
)
select n.*, %(worker)s
from unnest(
    %(names)s::text[], %(queues)s::text[], %(priorities)s::smallint[], %(max_attempts)s::integer[],
    %(timeouts)s::double precision[], %(backoffs)s::pgqueue.backoff_kind[],
    %(bases)s::double precision[], %(maxes)s::double precision[], %(jitters)s::real[]
) as n
on conflict (name) do update
set queue = excluded.queue, priority = excluded.priority, max_attempts = excluded.max_attempts,
    timeout_seconds = excluded.timeout_seconds, backoff = excluded.backoff,
    backoff_base_seconds = excluded.backoff_base_seconds, backoff_max_seconds = excluded.backoff_max_seconds,
    backoff_jitter = excluded.backoff_jitter, registered_by = excluded.registered_by, registered_at = now()

-- name: insert_unique_job
-- insert_job for a job with a unique key: nothing is inserted (so no queue limit is in the
-- way) when a live job already holds the key; returns (id, held): the new job's id and
-- false, or the holder's id and true. A new job then takes the key (take_job_key), which
-- settles a race with a producer whose job is not committed yet.
with held as (
    select h.job_id from (select pgqueue.key_holder(%(task)s, %(unique_key)s) as job_id) h
    where h.job_id is not null
),
inserted as (
    insert into pgqueue.active_jobs (
        task, args, queue, priority, run_at, max_attempts, timeout_seconds,
        backoff, backoff_base_seconds, backoff_max_seconds, backoff_jitter
    )
    select
        %(task)s, %(args)s::jsonb, %(queue)s, %(priority)s,
        coalesce(%(run_at)s::timestamptz, now()) + make_interval(secs => %(delay)s::double precision),
        %(max_attempts)s, %(timeout_seconds)s::double precision,
        %(backoff)s::pgqueue.backoff_kind, %(backoff_base_seconds)s::double precision,
        %(backoff_max_seconds)s::double precision, %(backoff_jitter)s::real
    where not exists (select from held)
    returning id
)
select id, false from inserted
union all
select job_id, true from held

-- name: insert_job_by_name
-- Insert one job of a task this process does not know: options the caller left out come
-- from the task as its workers registered it, then from the defaults. With a unique key,
-- nothing is inserted when a live job holds it (as in insert_unique_job). Returns (id,
-- whether any worker registered the name, whether the id is the key's holder).
with held as (
    select h.job_id from (select pgqueue.key_holder(%(task)s, %(unique_key)s) as job_id) h
    where h.job_id is not null
),
registered as (select * from pgqueue.tasks where name = %(task)s),
inserted as (
    insert into pgqueue.active_jobs (
        task, args, queue, priority, run_at, max_attempts, timeout_seconds,
        backoff, backoff_base_seconds, backoff_max_seconds, backoff_jitter
    )
    select
        %(task)s, %(args)s::jsonb, coalesce(%(queue)s, r.queue, 'default'),
        coalesce(%(priority)s::smallint, r.priority, 0),
        coalesce(%(run_at)s::timestamptz, now()) + make_interval(secs => %(delay)s::double precision),
        coalesce(%(max_attempts)s::integer, r.max_attempts, 10),
        coalesce(%(timeout_seconds)s::double precision, r.timeout_seconds),
        coalesce(%(backoff)s::pgqueue.backoff_kind, r.backoff, 'exponential'),
        coalesce(%(backoff_base_seconds)s::double precision, r.backoff_base_seconds, 1),
        coalesce(%(backoff_max_seconds)s::double precision, r.backoff_max_seconds, 3600),
        coalesce(%(backoff_jitter)s::real, r.backoff_jitter, 0.1)
    from (values (1)) as one
    left join registered r on true
    where not exists (select from held)
    returning id
)
select id, exists (select 1 from registered), false from inserted
union all
select job_id, true, true from held

-- name: worker_seen
-- A worker is alive (at start and every maintenance round); lost if not seen for %(ttl)s s.
select pgqueue.worker_seen(%(worker)s, %(host)s, %(pid)s, %(queues)s::text[], %(concurrency)s,
                           %(version)s, %(ttl)s, %(now)s)

-- name: worker_stopped
-- A worker says it stopped.
select pgqueue.worker_stopped(%(worker)s)

-- name: prune_worker_sessions
-- The leader forgets workers that stopped or were lost a day ago.
select pgqueue.prune_worker_sessions()

-- name: metrics_queue_stats
-- The exporter's scrape: jobs per queue and state, and the oldest ready job's age.
select queue, state, jobs, oldest_age_seconds from pgqueue.queue_stats

-- name: metrics_workers
-- The exporter's scrape: worker processes by status.
select status, count(*) from pgqueue.workers group by status

-- name: health_queues
-- Per queue with jobs waiting (and not paused): ready jobs, the oldest one's age, and how many live
-- workers serve the queue: those that say so, and those that run its jobs without
-- saying (workers of a pgqueue older than worker presence, during a rolling upgrade).
select s.queue, s.jobs, s.oldest_age_seconds,
       (select count(*) from pgqueue.workers w
        where w.status = 'live' and s.queue = any(w.queues))
       + (select count(distinct j.worker) from pgqueue.active_jobs j
          where j.state = 'running' and j.queue = s.queue
            and not exists (select from pgqueue.worker_sessions w where w.worker = j.worker))
       as live_workers
from pgqueue.queue_stats s
where s.state = 'ready'
  -- a paused queue's jobs wait on purpose
  and not exists (select from pgqueue.queues c where c.name = s.queue and c.paused)
order by s.queue

-- name: health_dead_recent
-- Jobs dead-lettered in the last %(seconds)s seconds (from the finished-jobs index).
select count(*) from pgqueue.finished_jobs
where state = 'dead' and finished_at >= now() - make_interval(secs => %(seconds)s)
  and finished_at is not null

-- name: health_live_workers
-- Live worker processes.
select count(*) from pgqueue.workers where status = 'live'

-- name: metrics_known_queues
-- Queues the exporter reports even when empty: those of registered tasks and of workers.
select queue from pgqueue.tasks
union
select unnest(queues) from pgqueue.worker_sessions

-- name: prune_jobs
-- One batch of pruning: finished jobs past their retention, at most %(limit)s per policy;
-- retention counted back from %(now)s (null: now), so a prune by hand that fixes it ends
-- even while jobs finish faster than it removes them.
select state, queue, jobs from pgqueue.prune_jobs(%(limit)s, %(dry_run)s, %(now)s)

-- name: retention
-- The retention policies: how long finished jobs are kept, per state and queue.
select state, queue, keep::text from pgqueue.retention order by state, queue

-- name: database_now
-- The database's clock.
select now()

-- name: clear_retention
-- Remove a queue's own retention for a state (its jobs follow the state's default again);
-- true when there was one.
select pgqueue.clear_retention(%(state)s, %(queue)s)

-- name: set_retention
-- Keep finished jobs of a state (and queue, or '*') for this long (NULL: forever).
select pgqueue.set_retention(%(state)s, %(keep)s::interval, %(queue)s)

-- name: pause_queue
-- Stop every worker claiming the queue's jobs.
select pgqueue.pause_queue(%(queue)s)

-- name: resume_queue
-- Let workers claim the queue's jobs again (and wake the idle ones).
select pgqueue.resume_queue(%(queue)s)

-- name: limit_queue
-- Set (NULL: lift) a queue's limits: running jobs across all workers, starts per second,
-- depth, and running jobs in each worker.
select pgqueue.limit_queue(%(queue)s, %(max_running)s::integer, %(rate_per_second)s::double precision,
                           %(burst)s::integer, %(max_depth)s::integer, %(max_per_worker)s::integer)

-- name: queue_controls
-- The queues with controls, and their running jobs.
select queue, paused, max_running, rate_per_second, burst, running, max_depth, max_per_worker
from pgqueue.queue_controls order by queue

-- name: take_job_key
-- A job just inserted takes its unique key, or is removed again in favour of the job that
-- holds it: (the holder's id, duplicate).
select id, duplicate
from pgqueue.take_job_key(%(task)s, %(key)s, %(id)s, make_interval(secs => %(window)s::double precision))

-- name: prune_job_keys
-- The leader forgets up to %(limit)s unique keys no job holds any more.
select pgqueue.prune_job_keys(%(limit)s)

-- name: declare_schedule
-- Add or update a schedule (a changed expression or time zone is planned afresh).
select pgqueue.declare_schedule(%(name)s, %(task)s, %(cron)s, %(timezone)s, %(args)s::jsonb, %(queue)s,
    %(priority)s, %(max_attempts)s, %(timeout_seconds)s, %(missed)s, %(max_catch_up)s, %(source)s)

-- name: pause_schedule
select pgqueue.pause_schedule(%(name)s)

-- name: resume_schedule
select pgqueue.resume_schedule(%(name)s)

-- name: remove_schedule
select pgqueue.remove_schedule(%(name)s)

-- name: list_schedules
select name, task, cron, timezone, paused, missed, next_run_at, last_run_at, last_job_id, source
from pgqueue.schedules order by name

-- name: due_schedules
-- Unpaused schedules whose next tick has come (or that were never planned), with the
-- clock the pass uses (the database's unless injected).
select name, cron, timezone, missed, max_catch_up, next_run_at, coalesce(%(now)s, now())
from pgqueue.schedules
where not paused and (next_run_at is null or next_run_at <= coalesce(%(now)s, now()))
order by next_run_at nulls first
limit %(limit)s

-- name: fire_schedule
-- Enqueue a schedule's ticks and move it on, if no other worker did first.
select tick, job_id, duplicate
from pgqueue.fire_schedule(%(name)s, %(expected)s, %(ticks)s::timestamptz[], %(next)s, %(window)s)

-- name: next_schedule_in
-- Seconds until the next tick of any unpaused schedule; null when there is none.
select extract(epoch from min(coalesce(next_run_at, coalesce(%(now)s, now()))) - coalesce(%(now)s, now()))::double precision
from pgqueue.schedules where not paused

-- name: age_priorities
-- Promote jobs due for longer than %(after)s to the top priority waiting in their queue.
select pgqueue.age_priorities(make_interval(secs => %(after)s), %(limit)s)
