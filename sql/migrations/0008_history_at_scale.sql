-- compatible-with: 1
-- History at scale: the hot path stays flat however much history and future the table
-- holds, heartbeats are HOT updates, vacuum keeps up, and finished jobs are pruned.
--
-- Like 0007, the index built here locks pgqueue.jobs against writes for as long as the
-- build takes (it reads the whole table to find the running jobs: seconds for millions
-- of rows). On a big table, build it first by hand with CREATE INDEX CONCURRENTLY under
-- the same name and definition; this migration then skips it.

-- Heartbeats as HOT updates: an update that changes no indexed column can stay on its
-- page without touching any index. The lease index (lease_expires_at) made every
-- heartbeat a full update with an index entry of its own. Running jobs are few (at most
-- every worker's concurrency), so the rescue can read them all by this index instead,
-- which heartbeats leave alone; so can "the jobs a worker holds".
create index if not exists jobs_running on pgqueue.jobs (worker) where state = 'running';
drop index if exists pgqueue.jobs_lease;

select pgqueue.require_valid_indexes(array['jobs_running']);  -- see 0007

-- Room on each page for the new version of a heartbeat's row (HOT needs the same page;
-- pages written before this migration stay full until rewritten), and autovacuum sized
-- for a table that churns: the defaults wait for 20% of the table to be dead, which with
-- millions of finished jobs kept is millions of dead tuples in the hot rows first. Now
-- 5,000 dead rows plus 2% of the table start a vacuum (about 205,000 with 10 million
-- jobs kept: retention keeps the table small), and it runs unthrottled (no sleeping
-- between pages: a queue's table is better vacuumed fast than gently).
alter table pgqueue.jobs set (
    fillfactor = 80,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_threshold = 5000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

-- Claims do not read the future. The claim index is (queue, priority desc, run_at, id):
-- a claim that scans it in that order for due jobs first reads every job scheduled for
-- later at a higher priority (20,000 of them made a claim read 123 buffers instead of 3).
-- Now a claim takes the priority levels of the queue one at a time, highest first (each
-- found by one probe of the index: a loose index scan), and in each level reads only the
-- due range, which ends at the first job not yet due.
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
    -- a queue named twice would be claimed from twice, in the wrong order
    p_queues := array(select distinct q from unnest(p_queues) as q);
    for v_level in
        -- each probe reads the first entry of a level: its priority and its earliest due
        -- time; only levels with a job due now are claimed from (a level that holds only
        -- jobs for later costs one probe, never a statement)
        with recursive levels(queue, priority, due) as (
            select q.name, first.priority, first.run_at
            from unnest(p_queues) as q(name)
            cross join lateral (select j.priority, j.run_at from pgqueue.jobs j
                                where j.state = 'queued' and j.queue = q.name
                                order by j.priority desc, j.run_at limit 1) as first
            union all
            select l.queue, next.priority, next.run_at
            from levels l
            cross join lateral (select j.priority, j.run_at from pgqueue.jobs j
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
                select j.id, j.run_at from pgqueue.jobs j
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
        update pgqueue.jobs j
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

-- Retention: how long finished jobs are kept, per final state, with an override per
-- queue. A NULL `keep` keeps them forever. Shared by every worker (the maintenance
-- leader prunes by it, whichever worker leads), changed with pgqueue.set_retention or
-- `pgqueue retention`.
create table pgqueue.retention (
    state pgqueue.job_state not null
        constraint retention_final_state check (state in ('succeeded', 'dead', 'cancelled')),
    queue text not null default '*',  -- '*': every queue without a row of its own
    keep interval constraint retention_keep_not_negative check (keep >= interval '0'),
    primary key (state, queue)
);
insert into pgqueue.retention (state, queue, keep) values
    ('succeeded', '*', interval '1 day'),
    ('dead', '*', interval '14 days'),
    ('cancelled', '*', interval '1 day');

create function pgqueue.set_retention(p_state text, p_keep interval, p_queue text default '*')
returns void
language plpgsql volatile as $$
begin
    if p_state is null or p_state not in ('succeeded', 'dead', 'cancelled') then
        raise exception 'pgqueue.set_retention: state must be succeeded, dead or cancelled, got %',
            coalesce(quote_literal(p_state), 'NULL') using errcode = '22023';
    end if;
    if p_keep < interval '0' then
        raise exception 'pgqueue.set_retention: keep must not be negative, got %', p_keep
            using errcode = '22023';
    end if;
    if p_queue is null or (p_queue <> '*' and p_queue !~ '^[A-Za-z0-9_.:-]{1,100}$') then
        raise exception 'pgqueue.set_retention: invalid queue name %', coalesce(quote_literal(p_queue), 'NULL')
            using errcode = '22023';
    end if;
    insert into pgqueue.retention as r (state, queue, keep)
    values (p_state::pgqueue.job_state, p_queue, p_keep)
    on conflict (state, queue) do update set keep = excluded.keep;
end
$$;

-- Remove finished jobs past their retention: at most p_limit per (state, queue) policy
-- and call, oldest first, skipping rows another transaction holds (a redrive); each
-- call is a short transaction that never touches a queued or running row, so claims and
-- enqueues never wait for it. Returns what it removed (or, with p_dry_run, how many
-- rows are past their retention now, without removing any).
-- A queue kept longer than its state's default ('*') is read past by the default's
-- policy on each call (its rows lie in the same range): give long overrides to small
-- queues, or raise the default instead.
create function pgqueue.prune_jobs(
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
            select count(*) into v_count from pgqueue.jobs j
            where j.state = v_policy.state and j.finished_at is not null
              and j.finished_at < v_now - v_policy.keep
              and (case when v_policy.queue = '*' then j.queue <> all(v_policy.overridden)
                        else j.queue = v_policy.queue end);
        else
            with doomed as (
                select j.id from pgqueue.jobs j
                where j.state = v_policy.state and j.finished_at is not null
                  and j.finished_at < v_now - v_policy.keep
                  and (case when v_policy.queue = '*' then j.queue <> all(v_policy.overridden)
                            else j.queue = v_policy.queue end)
                order by j.finished_at
                limit p_limit
                for update skip locked
            ),
            gone as (
                delete from pgqueue.jobs j using doomed d where j.id = d.id returning 1
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
