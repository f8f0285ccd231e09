-- compatible-with: 1
-- Back-pressure: a queue may have a maximum depth (jobs waiting: ready or scheduled). An
-- enqueue that would take it past that fails, all of its jobs with it, with SQLSTATE
-- 53400 and the depth in its detail (the Python producer raises QueueFull), so a web app
-- can answer 503 instead of piling up work it cannot do. Retries and rescues never count
-- as enqueues: a job already accepted is never refused.
--
-- The check runs in the hot table's insert trigger, once per statement: one probe of
-- pgqueue.queues (about 20 µs a statement, measured), and a count of waiting jobs only
-- when a queue has a maximum (folding the probe into the wake-up query cost as much). It
-- counts committed jobs and the statement's own: enqueues in flight at the same moment
-- can each pass, so the depth can overshoot by those (no lock makes producers wait).

alter table pgqueue.queues
    add column max_depth integer constraint queues_max_depth_positive check (max_depth >= 1);

-- Statements that move jobs back into the hot table run with pgqueue.requeue on.
alter function pgqueue.complete_jobs_v2(text, bigint[], integer[], text[], jsonb[], jsonb[],
    double precision[], timestamptz[], timestamptz[], timestamptz) set pgqueue.requeue = 'on';
alter function pgqueue.rescue_expired_jobs(timestamptz, integer, integer) set pgqueue.requeue = 'on';
alter function pgqueue.retry_job(bigint, timestamptz) set pgqueue.requeue = 'on';

create or replace function pgqueue.notify_queues() returns trigger
language plpgsql as $$
declare
    v_full record;
    v_depth integer;
begin
    perform pg_notify('pgqueue_jobs', q.queue)
    from (select distinct queue from new_jobs where state = 'queued' and run_at <= now()) q;
    if current_setting('pgqueue.requeue', true) is distinct from 'on'
       and exists (select from pgqueue.queues c where c.max_depth is not null) then
        select c.name, c.max_depth, d.depth into v_full
        from pgqueue.queues c
        cross join lateral (
            -- counted up to one past the maximum: a deep queue costs no more than that
            select count(*)::integer as depth
            from (select from pgqueue.active_jobs j
                  where j.state = 'queued' and j.queue = c.name
                  limit c.max_depth + 1) as waiting
        ) d
        where c.max_depth is not null
          and c.name in (select distinct n.queue from new_jobs n)
          and d.depth > c.max_depth
        order by c.name
        limit 1;
        if found then
            -- refused: now the whole depth, without this statement's jobs
            select count(*)::integer into v_depth from pgqueue.active_jobs j
            where j.state = 'queued' and j.queue = v_full.name;
            v_depth := v_depth - (select count(*)::integer from new_jobs n where n.queue = v_full.name);
            raise exception 'pgqueue: queue % is full: % job(s) waiting, at most % allowed',
                quote_literal(v_full.name), v_depth, v_full.max_depth
                using errcode = '53400',
                      detail = format('queue=%s depth=%s max_depth=%s', v_full.name, v_depth, v_full.max_depth),
                      hint = 'try again later, or raise it: pgqueue queue limit QUEUE --max-depth N';
        end if;
    end if;
    return null;
end
$$;

-- 0010's limit_queue, with the maximum depth.
drop function pgqueue.limit_queue(text, integer, double precision, integer);

create function pgqueue.limit_queue(
    p_queue text,
    p_max_running integer,
    p_rate_per_second double precision,
    p_burst integer default null,
    p_max_depth integer default null
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
    perform pgqueue.require_known_queue(p_queue, 'pgqueue.limit_queue');
    insert into pgqueue.queues as q (name, max_running, rate_per_second, burst, max_depth, tokens, refilled_at)
    values (p_queue, p_max_running, p_rate_per_second, p_burst, p_max_depth,
            case when p_rate_per_second is not null
                 then coalesce(p_burst, greatest(1, ceil(p_rate_per_second))) else 0 end, now())
    on conflict (name) do update
    set max_running = excluded.max_running, rate_per_second = excluded.rate_per_second,
        burst = excluded.burst, max_depth = excluded.max_depth, tokens = excluded.tokens,
        refilled_at = excluded.refilled_at, changed_at = now();
    delete from pgqueue.queues
    where name = p_queue and max_running is null and rate_per_second is null and max_depth is null
      and not paused;
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
      and not paused;
    perform pg_notify('pgqueue_jobs', p_queue);
end
$$;

create or replace view pgqueue.queue_controls as
select q.name as queue, q.paused, q.max_running, q.rate_per_second,
       case when q.rate_per_second is not null
            then coalesce(q.burst, greatest(1, ceil(q.rate_per_second)))::integer end as burst,
       (select count(*) from pgqueue.active_jobs j where j.state = 'running' and j.queue = q.name) as running,
       q.changed_at,
       q.max_depth
from pgqueue.queues q;
