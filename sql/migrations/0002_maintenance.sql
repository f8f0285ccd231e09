-- compatible-with: 1
-- Maintenance runs once per database, not once per worker: a leader holds a lease row
-- (not a session advisory lock, which a transaction pooler such as PgBouncer cannot
-- keep) and renews it while it works; when it dies, another worker takes over once
-- the lease runs out.
create table pgqueue.leaders (
    duty text primary key,
    worker text not null,
    elected_at timestamptz not null,
    expires_at timestamptz not null
);

-- Become (or stay) the leader of `p_duty` for `p_seconds`; true when this worker leads.
create function pgqueue.lead(
    p_duty text,
    p_worker text,
    p_seconds double precision,
    p_now timestamptz default null
) returns boolean
language plpgsql volatile as $$
declare
    v_now timestamptz := coalesce(p_now, now());
begin
    insert into pgqueue.leaders as l (duty, worker, elected_at, expires_at)
    values (p_duty, p_worker, v_now, v_now + make_interval(secs => p_seconds))
    on conflict (duty) do update
    set worker = excluded.worker,
        elected_at = case when l.worker = excluded.worker then l.elected_at else excluded.elected_at end,
        expires_at = excluded.expires_at
    where l.worker = excluded.worker or l.expires_at < v_now;
    return found;
end
$$;

-- Step down (at shutdown), so the next leader need not wait for the lease to run out.
create function pgqueue.resign(p_duty text, p_worker text)
returns void
language sql volatile as $$
    delete from pgqueue.leaders where duty = p_duty and worker = p_worker;
$$;

-- Every attempt that did not succeed, one JSON object each (attempt, worker, outcome,
-- started_at, ended_at, seconds): the rescue below records attempts lost with their
-- worker, complete_jobs_v2 (0003) every other; the pgqueue.attempts view reads it.
alter table pgqueue.jobs add column history jsonb not null default '[]';

-- Rescue in bounded batches, with backoff, and with a limit for poison jobs.
-- * At most p_limit jobs per call (the leader calls again while a batch comes back
--   full), so one sweep never holds thousands of row locks in one transaction.
-- * A rescued job waits its retry policy's backoff like any failed attempt, instead of
--   running again at once everywhere.
-- * A job whose last p_poison_after attempts all ended with an expired lease kills (or
--   hangs) every worker that runs it: it is dead-lettered even with attempts left.
drop function pgqueue.rescue_expired_jobs(timestamptz);

create function pgqueue.rescue_expired_jobs(
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
        from pgqueue.jobs j
        where j.state = 'running' and j.lease_expires_at < v_now
        order by j.lease_expires_at
        limit p_limit
        for update skip locked
    ),
    updated as (
        update pgqueue.jobs j
        set state = case when j.attempt >= j.max_attempts or e.expiries >= p_poison_after
                         then 'dead'::pgqueue.job_state else 'queued' end,
            run_at = v_now + make_interval(secs => pgqueue.backoff_seconds(
                j.backoff, j.backoff_base_seconds, j.backoff_max_seconds, j.backoff_jitter, j.attempt, j.id)),
            finished_at = case when j.attempt >= j.max_attempts or e.expiries >= p_poison_after then v_now end,
            errors = j.errors || jsonb_build_array(jsonb_build_object(
                'attempt', j.attempt, 'at', v_now, 'worker', j.worker, 'kind', 'lease_expired',
                'error', case when e.expiries >= p_poison_after and j.attempt < j.max_attempts
                    then format('lease expired at %s: worker %s stopped heartbeating; dead-lettered '
                                'because its last %s attempts all ended this way (it kills or hangs '
                                'its worker)', j.lease_expires_at, j.worker, e.expiries)
                    else format('lease expired at %s: worker %s stopped heartbeating (crashed or lost '
                                'its connection)', j.lease_expires_at, j.worker) end,
                'traceback', null)),
            -- lost with its worker: it started at its claim as far as the database knows
            -- (the handler's own start never came back), and when it ended is not known
            history = j.history || jsonb_build_array(jsonb_build_object(
                'attempt', j.attempt, 'worker', j.worker, 'outcome', 'lease_expired',
                'started_at', j.started_at, 'ended_at', null, 'seconds', null)),
            worker = null,
            lease_expires_at = null
        from expired e
        where j.id = e.id
        returning j.id, j.state, j.queue
    ),
    woken as (
        select pg_notify('pgqueue_jobs', q.queue)
        from (select distinct u.queue from updated u where u.state = 'queued') q
    )
    select u.id, u.state from updated u cross join (select count(*) from woken) w;
end
$$;
