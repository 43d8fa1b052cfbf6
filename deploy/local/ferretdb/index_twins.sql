-- Index twins for FerretDB 1.x on PostgreSQL (applied by deploy/local/stack.py, as the
-- superuser, in single-user mode, to FerretDB's database).
--
-- FerretDB stores a collection as a table of one jsonb column, `_jsonb`, and a MongoDB index
-- on one field as a btree index on `(_jsonb -> 'field')`. It pushes an equality filter down to
-- PostgreSQL as `_jsonb -> $1 @> $2`, which a btree cannot serve: every lookup by `_id`, every
-- upsert of the document views and every query on an indexed field reads the whole table, so
-- their cost grows with the collection. For each such single-field index this adds a GIN twin,
-- `(_jsonb -> 'field') jsonb_path_ops`, which serves `@>`, when the index is created (an event
-- trigger) and for the indexes that already exist. A twin goes with its table; a dropped MongoDB
-- index leaves its twin until then. Twins are built without GIN's pending list (`fastupdate =
-- off`): every lookup would otherwise read that list through, and the views look up as often as
-- they write.

CREATE OR REPLACE FUNCTION public.waypost_index_twin(btree oid) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    field text;
    target regclass;
    twin text;
BEGIN
    SELECT i.indrelid::regclass,
           (regexp_match(
               pg_get_indexdef(i.indexrelid),
               'USING btree \(\(\(_jsonb -> ''((?:[^'']|'''')*)''::text\)\)\)$'
           ))[1]
      INTO target, field
      FROM pg_index i
     WHERE i.indexrelid = btree AND i.indnatts = 1;
    IF field IS NULL THEN
        RETURN;  -- not a FerretDB index on one top-level field (or a twin itself)
    END IF;
    twin := left((SELECT relname FROM pg_class WHERE oid = btree), 59) || '_gin';
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS %I ON %s USING gin ((_jsonb -> %L) jsonb_path_ops) '
        'WITH (fastupdate = off)',
        twin, target, replace(field, '''''', '''')
    );
END
$fn$;

CREATE OR REPLACE FUNCTION public.waypost_index_twins_on_create() RETURNS event_trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    created record;
BEGIN
    FOR created IN
        SELECT objid FROM pg_event_trigger_ddl_commands() WHERE object_type = 'index'
    LOOP
        PERFORM public.waypost_index_twin(created.objid);
    END LOOP;
END
$fn$;

DROP EVENT TRIGGER IF EXISTS waypost_index_twins;

CREATE EVENT TRIGGER waypost_index_twins ON ddl_command_end WHEN TAG IN ('CREATE INDEX')
    EXECUTE FUNCTION public.waypost_index_twins_on_create();

DO $do$
DECLARE
    existing record;
BEGIN
    FOR existing IN
        SELECT i.indexrelid
          FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
          JOIN pg_namespace n ON n.oid = t.relnamespace
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
    LOOP
        PERFORM public.waypost_index_twin(existing.indexrelid);
    END LOOP;
END
$do$;
