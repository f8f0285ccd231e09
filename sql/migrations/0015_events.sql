-- compatible-with: 1
-- Lifecycle events as a stream: with events on, every change of a job's life sends a
-- NOTIFY on pgqueue_events, as JSON: {"event", "job", "queue", "task", "attempt", "state"}
-- (and "progress" for progress). A process LISTENs (pgqueue.App.subscribe, or psql) and
-- sees them as they commit, from every worker and producer, whatever wrote them (Python,
-- SQL, a trigger of the user's own).
--
-- Events, by what happened to the row:
--   enqueued   a new job (not a retry) entered the hot table
--   started    a claim took it (queued -> running)
--   progress   its handler reported progress
--   retrying   an attempt failed and another is scheduled
--   rescued    its worker stopped heartbeating; it is requeued
--   requeued   back in the queue without a failed attempt (snoozed, released at shutdown,
--              handed back by a worker that does not know its task, redriven)
--   succeeded, dead, cancelled: it ended so
--
-- Off by default: each event is one NOTIFY of about 150 bytes (per-row triggers), which a
-- queue doing thousands of jobs a second should not pay unasked. pgqueue.enable_events()
-- and disable_events() add and drop the triggers (`pgqueue events on|off`).

-- Which event an insert or update is: a requeue (pgqueue.requeue on, 0012) is told by the
-- error entry the statement appended, if any (its "at" is the statement's time).
create function pgqueue.publish_job_event() returns trigger
language plpgsql as $$
declare
    v_event text;
    v_error jsonb := new.errors -> -1;
begin
    if tg_table_name = 'finished_jobs' then
        v_event := new.state::text;
    elsif tg_op = 'UPDATE' then
        v_event := 'started';
    elsif current_setting('pgqueue.requeue', true) is distinct from 'on' then
        v_event := case when jsonb_array_length(new.errors) > 0 then 'requeued' else 'enqueued' end;
    elsif v_error is null or (v_error ->> 'at')::timestamptz is distinct from now() then
        v_event := 'requeued';  -- nothing appended: a snooze
    elsif v_error ->> 'kind' = 'lease_expired' then
        v_event := 'rescued';
    elsif v_error ->> 'kind' in ('released', 'unknown_task', 'bad_arguments', 'redriven') then
        v_event := 'requeued';
    else
        v_event := 'retrying';
    end if;
    perform pg_notify('pgqueue_events', json_build_object(
        'event', v_event, 'job', new.id, 'queue', new.queue, 'task', new.task,
        'attempt', new.attempt, 'state', new.state)::text);
    return null;
end
$$;

create function pgqueue.publish_progress_event() returns trigger
language plpgsql as $$
begin
    perform pg_notify('pgqueue_events', json_build_object(
        'event', 'progress', 'job', new.job_id, 'progress', new.progress)::text);
    return null;
end
$$;

create function pgqueue.events_enabled() returns boolean
language sql stable as $$
    select exists (select from pg_trigger where tgname = 'jobs_events_enqueued'
                   and tgrelid = 'pgqueue.active_jobs'::regclass)
$$;

create function pgqueue.enable_events() returns boolean
language plpgsql volatile as $$
begin
    if pgqueue.events_enabled() then
        return false;
    end if;
    create trigger jobs_events_enqueued after insert on pgqueue.active_jobs
        for each row execute function pgqueue.publish_job_event();
    create trigger jobs_events_started after update of state on pgqueue.active_jobs
        for each row when (old.state = 'queued' and new.state = 'running')
        execute function pgqueue.publish_job_event();
    create trigger jobs_events_finished after insert on pgqueue.finished_jobs
        for each row execute function pgqueue.publish_job_event();
    create trigger jobs_events_progress after insert or update on pgqueue.job_progress
        for each row execute function pgqueue.publish_progress_event();
    return true;
end
$$;

create function pgqueue.disable_events() returns boolean
language plpgsql volatile as $$
begin
    if not pgqueue.events_enabled() then
        return false;
    end if;
    drop trigger jobs_events_enqueued on pgqueue.active_jobs;
    drop trigger jobs_events_started on pgqueue.active_jobs;
    drop trigger jobs_events_finished on pgqueue.finished_jobs;
    drop trigger jobs_events_progress on pgqueue.job_progress;
    return true;
end
$$;
