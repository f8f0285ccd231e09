-- compatible-with: 1
-- Watching the queue: what the status command, the health check, the metrics exporter
-- and users' own SQL ask, answered from indexes and small tables, never from a scan of
-- all history.
--
-- Building the two indexes below takes a lock that blocks writes to pgqueue.jobs for as
-- long as the build runs: seconds for a million rows. On a larger table, build them
-- first by hand with CREATE INDEX CONCURRENTLY under the same names and definitions;
-- this migration then skips them.

-- Finished jobs by final state and when they finished: "what happened in the last hour"
-- (task statistics, throughput, failures, dead-letter growth) reads that window alone, one
-- range per final state, and pruning (0008) reads each state's expired range alone.
create index if not exists jobs_finished on pgqueue.jobs (state, finished_at) where finished_at is not null;
-- The dead letter by id, with its queue: its size per queue counted from this index
-- alone, and a redrive of all of it paged by id (its newest entries come from
-- jobs_finished, read backwards).
create index if not exists jobs_dead on pgqueue.jobs (id) include (queue) where state = 'dead';
-- Jobs waiting to be retried after a failure: their errors, without reading a backlog of
-- fresh jobs.
create index if not exists jobs_retrying on pgqueue.jobs (id) where state = 'queued' and attempt > 0;

-- An index of the same name left INVALID by a CREATE INDEX CONCURRENTLY that failed would be
-- skipped by `create index if not exists` and then never used: every query it serves would
-- read all history. Migrations that build indexes call this to fail loudly instead.
create function pgqueue.require_valid_indexes(p_names text[])
returns void
language plpgsql as $$
declare
    v_index text;
begin
    select c.relname into v_index
    from pg_index i
    join pg_class c on c.oid = i.indexrelid
    join pg_namespace n on n.oid = c.relnamespace
    where n.nspname = 'pgqueue' and c.relname = any(p_names) and not i.indisvalid
    limit 1;
    if v_index is not null then
        raise exception 'pgqueue: index pgqueue.% is invalid (a CREATE INDEX CONCURRENTLY that failed?): drop it, or build it again concurrently, then migrate', v_index;
    end if;
end
$$;
select pgqueue.require_valid_indexes(array['jobs_finished', 'jobs_dead', 'jobs_retrying']);

-- One row per worker process: each records itself when it starts and every maintenance
-- round after (about every 5 s), and says when it stops. A worker not seen until
-- `expires_at` is lost (killed, cut off). The maintenance leader deletes rows a day after
-- their worker stopped or was lost.
create table pgqueue.worker_sessions (
    worker text primary key,
    host text not null,
    pid integer not null,
    queues text[] not null,
    concurrency integer not null,
    version text not null,
    started_at timestamptz not null,
    last_seen_at timestamptz not null,
    expires_at timestamptz not null,
    stopped_at timestamptz
);

create function pgqueue.worker_seen(
    p_worker text,
    p_host text,
    p_pid integer,
    p_queues text[],
    p_concurrency integer,
    p_version text,
    p_ttl_seconds double precision,
    p_now timestamptz default null
) returns void
language sql volatile as $$
    insert into pgqueue.worker_sessions as w (
        worker, host, pid, queues, concurrency, version, started_at, last_seen_at, expires_at)
    values (p_worker, p_host, p_pid, p_queues, p_concurrency, p_version, coalesce(p_now, now()),
            coalesce(p_now, now()), coalesce(p_now, now()) + make_interval(secs => p_ttl_seconds))
    on conflict (worker) do update
    set last_seen_at = excluded.last_seen_at, expires_at = excluded.expires_at,
        queues = excluded.queues, concurrency = excluded.concurrency, stopped_at = null
$$;

create function pgqueue.worker_stopped(p_worker text, p_now timestamptz default null)
returns void
language sql volatile as $$
    update pgqueue.worker_sessions
    set stopped_at = coalesce(p_now, now()), expires_at = coalesce(p_now, now())
    where worker = p_worker
$$;

-- Forget workers that stopped or were lost more than `p_keep` ago, `p_limit` at a time.
create function pgqueue.prune_worker_sessions(
    p_keep interval default '1 day', p_limit integer default 1000, p_now timestamptz default null
) returns integer
language sql volatile as $$
    with gone as (
        delete from pgqueue.worker_sessions
        where worker in (
            select worker from pgqueue.worker_sessions
            where expires_at < coalesce(p_now, now()) - p_keep
            limit p_limit
            for update skip locked)
        returning 1
    )
    select count(*)::integer from gone
$$;

-- Live, lost and recently stopped workers, with the jobs each holds now.
create view pgqueue.workers as
select w.worker, w.host, w.pid, w.queues, w.concurrency, w.version,
       case when w.stopped_at is not null then 'stopped'
            when w.expires_at > now() then 'live'
            else 'lost' end as status,
       w.started_at, w.last_seen_at, w.stopped_at,
       (select count(*) from pgqueue.jobs j
        where j.state = 'running' and j.worker = w.worker) as jobs_in_hand
from pgqueue.worker_sessions w;

-- Per queue: jobs ready to run now, scheduled for later, running, dead-lettered; for the
-- ready ones, the oldest due time and its age. Reads the claim index (queued rows), the
-- lease index (running rows) and the dead-letter index: never finished history.
create view pgqueue.queue_stats as
select queue, state, jobs, oldest_due,
       extract(epoch from now() - oldest_due)::double precision as oldest_age_seconds
from (
    select j.queue, s.state, s.jobs, s.oldest_due
    from (select queue,
                 count(*) filter (where run_at <= now()) as ready,
                 count(*) filter (where run_at > now()) as scheduled,
                 min(run_at) filter (where run_at <= now()) as oldest_due
          from pgqueue.jobs where state = 'queued' group by queue) j
    cross join lateral (values ('ready', j.ready, j.oldest_due),
                               ('scheduled', j.scheduled, null::timestamptz)) as s(state, jobs, oldest_due)
    where s.jobs > 0
    union all
    select queue, 'running', count(*), null from pgqueue.jobs where state = 'running' group by queue
    union all
    select queue, 'dead', count(*), null from pgqueue.jobs where state = 'dead' group by queue
) as counts;

-- Per task, over the jobs that reached a final state since `p_since`: how many
-- succeeded, were dead-lettered or cancelled, how many attempts failed on the way, run
-- time percentiles and the mean wait (due time to start) of the successes.
create function pgqueue.task_stats_since(p_since timestamptz)
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
    from pgqueue.jobs j
    where j.state in ('succeeded', 'dead', 'cancelled') and j.finished_at >= p_since
      and j.finished_at is not null
    group by j.task
$$;

-- The last hour, as a view.
create view pgqueue.task_stats as
select * from pgqueue.task_stats_since(now() - interval '1 hour');

-- Jobs that reached a final state, per minute and queue, over the last hour.
create view pgqueue.throughput as
select date_trunc('minute', finished_at) as minute, queue, state, count(*) as jobs
from pgqueue.jobs
where state in ('succeeded', 'dead', 'cancelled') and finished_at >= now() - interval '1 hour'
  and finished_at is not null
group by 1, 2, 3;

-- Failed attempts since `p_since`, with their error: of the jobs that reached a final
-- state since then (the finished-jobs index), of those waiting for a retry (the retrying
-- index) and of those running a retry now; never a scan of all history or the backlog.
create function pgqueue.failures_since(p_since timestamptz)
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
        select * from pgqueue.jobs
        where state in ('succeeded', 'dead', 'cancelled') and finished_at >= p_since
          and finished_at is not null
        union all
        select * from pgqueue.jobs where state = 'queued' and attempt > 0
        union all
        select * from pgqueue.jobs where state = 'running' and attempt > 1
    ) as j
    cross join lateral jsonb_array_elements(j.errors) as e(entry)
    where (e.entry ->> 'at')::timestamptz >= p_since
      -- not failures: a redrive, hand-backs, a job released unfinished at shutdown
      and e.entry ->> 'kind' not in ('redriven', 'unknown_task', 'bad_arguments', 'released')
$$;
