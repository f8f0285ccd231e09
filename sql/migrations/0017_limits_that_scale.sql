-- compatible-with: 1
-- Queue controls, continued: a cap per worker, and global limits that cost nothing until
-- they can bind.
--
-- * max_per_worker: at most this many of a queue's jobs running in each worker (the
--   claim counts this worker's running jobs of the queue). Changed at run time like the
--   other limits (`pgqueue queue limit Q --max-per-worker N`), for every worker at its
--   next claim.
-- * A global running limit (0010) made every claim of the queue lock its row, so claims
--   took turns even when the limit was far from binding (58% of the unlimited drain,
--   measured). Now a claim locks it in KEY SHARE mode, and claims overlap, while the limit
--   cannot bind: the queue's running jobs plus the slots of every worker serving it that
--   has not stopped (pgqueue.worker_sessions, lapsed sessions included) stay within
--   max_running, and the claiming worker's own session is current and it asks for no
--   more than its slots. Each overlapping claim takes at most its
--   worker's slots, so together they cannot pass the limit. Otherwise (near the limit, a
--   worker not yet or no longer registered, a rate limit) the claim locks the row FOR
--   UPDATE and counts exactly, as before, which waits for the shared claims to commit.

alter table pgqueue.queues
    add column max_per_worker integer constraint queues_max_per_worker_positive check (max_per_worker >= 1);

-- Can queue p_queue's running limit not be passed by every live worker claiming at once?
create function pgqueue.limit_cannot_bind(p_queue text)
returns boolean
language sql stable as $$
    select c.max_running is not null and c.rate_per_second is null
       and (select count(*) from pgqueue.active_jobs j where j.state = 'running' and j.queue = p_queue)
         -- every worker that has not said it stopped, its session expired or not: one
         -- whose session lapsed a moment ago may still be claiming
         + (select coalesce(sum(w.concurrency), 0) from pgqueue.worker_sessions w
            where p_queue = any(w.queues) and w.stopped_at is null)
         <= c.max_running
    from pgqueue.queues c where c.name = p_queue
$$;

-- 0012's, with max_per_worker.
drop function pgqueue.limit_queue(text, integer, double precision, integer, integer);

create function pgqueue.limit_queue(
    p_queue text,
    p_max_running integer,
    p_rate_per_second double precision,
    p_burst integer default null,
    p_max_depth integer default null,
    p_max_per_worker integer default null
) returns void
language plpgsql volatile as $$
begin
    if p_max_running is not null and p_max_running < 1 then
        raise exception 'pgqueue.limit_queue: max_running must be at least 1 (or NULL for no limit), got %',
            p_max_running using errcode = '22023';
    end if;
    if p_rate_per_second is not null and not (p_rate_per_second > 0 and p_rate_per_second <= 1000000) then
        raise exception 'pgqueue.limit_queue: rate_per_second must be more than 0 and at most 1,000,000 (or NULL for no limit), got %',
            p_rate_per_second using errcode = '22023';
    end if;
    if p_burst is not null and (p_burst < 1 or p_rate_per_second is null) then
        raise exception 'pgqueue.limit_queue: burst must be at least 1, and goes with a rate, got % with rate %',
            p_burst, coalesce(p_rate_per_second::text, 'NULL') using errcode = '22023';
    end if;
    if p_max_depth is not null and p_max_depth < 1 then
        raise exception 'pgqueue.limit_queue: max_depth must be at least 1 (or NULL for no limit), got %',
            p_max_depth using errcode = '22023';
    end if;
    if p_max_per_worker is not null and p_max_per_worker < 1 then
        raise exception 'pgqueue.limit_queue: max_per_worker must be at least 1 (or NULL for no limit), got %',
            p_max_per_worker using errcode = '22023';
    end if;
    perform pgqueue.require_known_queue(p_queue, 'pgqueue.limit_queue');
    insert into pgqueue.queues as q (name, max_running, rate_per_second, burst, max_depth, max_per_worker,
                                     tokens, refilled_at)
    values (p_queue, p_max_running, p_rate_per_second, p_burst, p_max_depth, p_max_per_worker,
            case when p_rate_per_second is not null
                 then coalesce(p_burst, greatest(1, ceil(p_rate_per_second))) else 0 end, now())
    on conflict (name) do update
    set max_running = excluded.max_running, rate_per_second = excluded.rate_per_second,
        burst = excluded.burst, max_depth = excluded.max_depth, max_per_worker = excluded.max_per_worker,
        tokens = excluded.tokens, refilled_at = excluded.refilled_at, changed_at = now();
    delete from pgqueue.queues
    where name = p_queue and max_running is null and rate_per_second is null and max_depth is null
      and max_per_worker is null and not paused;
    -- a raised limit may let idle workers claim now
    perform pg_notify('pgqueue_jobs', p_queue);
end
$$;

create or replace function pgqueue.resume_queue(p_queue text)
returns void
language plpgsql volatile as $$
begin
    perform pgqueue.require_known_queue(p_queue, 'pgqueue.resume_queue');
    update pgqueue.queues set paused = false, changed_at = now() where name = p_queue;
    delete from pgqueue.queues
    where name = p_queue and max_running is null and rate_per_second is null and max_depth is null
      and max_per_worker is null and not paused;
    perform pg_notify('pgqueue_jobs', p_queue);
end
$$;

create or replace view pgqueue.queue_controls as
select q.name as queue, q.paused, q.max_running, q.rate_per_second,
       case when q.rate_per_second is not null
            then coalesce(q.burst, greatest(1, ceil(q.rate_per_second)))::integer end as burst,
       (select count(*) from pgqueue.active_jobs j where j.state = 'running' and j.queue = q.name) as running,
       q.changed_at,
       q.max_depth,
       q.max_per_worker
from pgqueue.queues q;

-- The claim, 0010's with the per-worker cap and shared locks while a limit cannot bind.
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
    v_controlled boolean;
    v_queues text[];
    v_caps integer[];
    v_granted integer[];
    v_level smallint;
    v_claimed integer;
    v_slots integer;
    v_queue text;
    v_shared text[] := '{}';
begin
    v_queues := array(select distinct q from unnest(p_queues) as q);
    v_controlled := exists (select from pgqueue.queues c where c.name = any(v_queues));
    if v_controlled then
        -- this worker's slots, when it is alive and asks for no more than it has
        select w.concurrency into v_slots from pgqueue.worker_sessions w
        where w.worker = p_worker and w.stopped_at is null and w.expires_at > v_now
          and p_limit <= w.concurrency;
        -- lock limited queues one by one in name order (no deadlock whatever the modes)
        for v_queue in
            select c.name from pgqueue.queues c
            where c.name = any(v_queues) and not c.paused
              and (c.max_running is not null or c.rate_per_second is not null)
            order by c.name
        loop
            if v_slots is not null and pgqueue.limit_cannot_bind(v_queue) then
                -- KEY SHARE: claims overlap, and a pause or a new limit (an UPDATE that
                -- changes no key) does not wait for them either
                perform 1 from pgqueue.queues c where c.name = v_queue for key share;
                v_shared := v_shared || v_queue;
            else
                perform 1 from pgqueue.queues c where c.name = v_queue for update;
            end if;
        end loop;
        select array_agg(s.name order by s.n), array_agg(s.cap order by s.n) into v_queues, v_caps
        from (
            select u.name, u.n, least(
                    p_limit,
                    case
                        when c.max_running is null then p_limit
                        -- shared: still safe now that we hold the lock? else skip it this time
                        -- (the next claim takes it exclusively)
                        when u.name = any(v_shared) then
                            case when pgqueue.limit_cannot_bind(u.name) then p_limit else 0 end
                        else c.max_running - (select count(*) from pgqueue.active_jobs j
                                              where j.state = 'running' and j.queue = u.name)::integer
                    end,
                    coalesce(c.max_per_worker - (select count(*) from pgqueue.active_jobs j
                                                 where j.state = 'running' and j.worker = p_worker
                                                   and j.queue = u.name)::integer, p_limit),
                    coalesce(case when c.rate_per_second is not null
                                  then floor(pgqueue.queue_tokens(c, v_now))::integer end, p_limit)) as cap
            from unnest(v_queues) with ordinality as u(name, n)
            left join pgqueue.queues c on c.name = u.name
            where c.name is null or not c.paused
        ) s
        where s.cap > 0;
        if v_queues is null then
            return;
        end if;
    else
        v_caps := array_fill(p_limit, array[cardinality(v_queues)]);
    end if;
    v_granted := v_caps;
    for v_level in
        -- each probe reads the first entry of a level: its priority and its earliest due
        -- time; only levels with a job due now are claimed from (0008)
        with recursive levels(queue, priority, due) as (
            select q.name, first.priority, first.run_at
            from unnest(v_queues) as q(name)
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
            from unnest(v_queues, v_caps) as q(name, cap)
            cross join lateral (
                select j.id, j.run_at from pgqueue.active_jobs j
                where j.state = 'queued' and j.queue = q.name and j.priority = v_level
                  and j.run_at <= v_now
                order by j.run_at, j.id
                limit least(v_left, q.cap)
                for update skip locked
            ) c
            where q.cap > 0
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
        if v_controlled and v_claimed > 0 then
            v_caps := pgqueue.caps_left(p_worker, v_now, v_queues, v_granted);
        end if;
    end loop;
    -- rate-limited queues spend a token per job started (a claim that waited for the lock
    -- may be older than the one before it: time never runs back)
    if v_controlled and exists (select from pgqueue.queues c
                                where c.name = any(v_queues) and c.rate_per_second is not null) then
        v_caps := pgqueue.caps_left(p_worker, v_now, v_queues, v_granted);
        update pgqueue.queues c
        set tokens = pgqueue.queue_tokens(c, v_now) - (s.granted - s.left_over),
            refilled_at = greatest(c.refilled_at, v_now)
        from unnest(v_queues, v_granted, v_caps) as s(name, granted, left_over)
        where c.name = s.name and c.rate_per_second is not null;
    end if;
end
$$;
