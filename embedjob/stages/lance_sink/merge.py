"""A rerun's Lance version by id (issue 29): the rows that changed go into the dataset with Lance's
merge-insert on ``id``, the ids no kept shard holds are deleted in the same commit, and every
other row stays in the fragment it is in (one new version, or none when nothing changed).

When: ``output.reuse: auto`` without ``output.overwrite``, and the dataset's latest version is the
one the previous run recorded in ``stats/lance.json`` (``merge_state``: the recipe, the version and
each shard's commit), of this run's recipe and columns. Otherwise, a recipe change, a dataset a
killed run left one version ahead, the version is the kept shards' fragments (``Overwrite``).

Which rows: those of the shards committed since the recorded version (their commit differs from
the recorded one), read from the fragments their markers list (written by the commit task, in no
version), compared by id with the dataset's rows; a row goes in when its id is new or any column
but ``shard`` differs. So a re-partitioned corpus commits nothing, and a reused row keeps the
``shard`` of the run that wrote it. Exactly-once: each id is in at most one kept shard, a matched
id is updated in place of its old row, and the deleted ids are those of the dataset that no kept
shard's ``vectors/`` file holds: the reuse lookup's removed ids (found partition by partition in its
join), or, when it did not read every commit the version was made of, the dataset's ids against
the kept shards'.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc

from embedjob.layout import LANCE_DATA, LANCE_DOCS, LANCE_STATS, VECTORS, shard_file
from embedjob.storage import Storage

logger = logging.getLogger(__name__)

KEEP_AS_WRITTEN = "shard"  # the one column a row of the same document may differ in and still stay


def state_of(keep: dict[str, dict[str, Any]], version: int) -> dict[str, Any]:
    """What ``stats/lance.json`` records for the next run: the recipe, the version, each shard's commit."""
    recipes = sorted({str(m.get("stage_hash")) for m in keep.values()})
    return {"recipe": recipes[0] if len(recipes) == 1 else None, "version": version,
            "shards": {k: keep[k].get("commit") for k in sorted(keep)}}


def merge_blocker(out: Storage, current, schema: pa.Schema, keep: dict[str, dict[str, Any]]) -> Optional[str]:
    """Why this run's version cannot be a merge of the latest one (None when it can)."""
    if current is None:
        return "no dataset yet"
    prev = {}
    if out.exists(LANCE_STATS):
        prev = out.read_json(LANCE_STATS).get("merge_state") or {}
    if not prev:
        return "no earlier run recorded its version"
    if prev.get("recipe") is None or prev.get("recipe") != state_of(keep, 0)["recipe"]:
        return "the recipe changed"
    if prev.get("version") != current.version:
        return f"version {current.version} is not the one the last run recorded ({prev.get('version')})"
    if not current.schema.equals(schema, check_metadata=False):
        return "the columns changed"
    gone = {d.path for f in current.get_fragments() for d in f.metadata.files} - set(out.list(LANCE_DATA))
    if gone:
        return f"{len(gone)} data file(s) of version {current.version} are gone"
    if any(len(f["files"]) != 1 for k in keep for f in (keep[k].get("lance") or {}).get("fragments", [])
           if keep[k].get("commit") != prev["shards"].get(k)):
        return "a fragment of several data files"
    return None


def _read_fragments(uri: str, opts: dict[str, str], part: dict[str, Any]) -> list[pa.Table]:
    from lance.file import LanceFileReader

    return [LanceFileReader(f"{uri}/data/{f['files'][0]['path']}", storage_options=opts or None).read_all().to_table()
            for f in part["fragments"]]


def changed_rows(new: pa.Table, cur: pa.Table) -> pa.Array:
    """Mask of ``new``'s rows whose id is not in ``cur`` or whose columns (but ``shard``) differ."""
    cols = [c for c in new.column_names if c != KEEP_AS_WRITTEN]
    at = {v: i for i, v in enumerate(cur.column("id").to_pylist())}
    pos = [at.get(v, -1) for v in new.column("id").to_pylist()]
    a = {c: new.column(c).to_pylist() for c in cols}
    b = {c: cur.column(c).to_pylist() for c in cols}
    return pa.array([p < 0 or any(a[c][r] != b[c][p] for c in cols) for r, p in enumerate(pos)], pa.bool_())


def _id_filter(ids: list[Any]) -> str:
    quote = (lambda v: "'" + str(v).replace("'", "''") + "'") if ids and isinstance(ids[0], str) else str
    return f"id IN ({', '.join(quote(v) for v in ids)})"


def removed_ids(out: Storage, current, keep: dict[str, dict[str, Any]], prev: dict[str, Any],
                removed: Optional[dict[str, Any]]) -> tuple[list[Any], str]:
    """The dataset's ids no kept shard holds, and where they came from: the reuse lookup's removed
    ids (``removed``: its folder, one file per partition, and the old commits it read) when the
    version's rows are all of shards kept as they were or of commits the lookup read, so that no
    process holds more than the removed ids; else the dataset's ``id`` column against the kept
    shards' ids (all of them, in the driver)."""
    if removed is not None:
        read = removed.get("read") or {}
        if all(read.get(k) == c or (keep.get(k) or {}).get("commit") == c for k, c in prev.items()):
            folder = removed["folder"]
            ids: list[Any] = []
            for name in out.list(folder, suffix=".parquet"):
                ids += out.read_parquet(f"{folder}/{name}").column("id").to_pylist()
            id_type = current.schema.field("id").type
            if ids and not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
                ids = pa.array(ids, pa.string()).cast(id_type).to_pylist()  # the lookup's ids are strings
            return sorted(ids), "lookup"
    kept: set[Any] = set()
    for k in keep:
        kept.update(out.read_parquet(shard_file(VECTORS, k), columns=["id"]).column("id").to_pylist())
    return sorted(set(current.to_table(columns=["id"]).column("id").to_pylist()) - kept), "dataset scan"


def merge_docs(out: Storage, current, keep: dict[str, dict[str, Any]], *,
               dataset: str = LANCE_DOCS, removed: Optional[dict[str, Any]] = None) -> tuple[Any, dict[str, Any]]:
    """Merge-insert the changed rows of the shards committed since the recorded version and delete the
    ids no kept shard holds (:func:`removed_ids`), in one commit; returns the latest dataset and the counts."""
    import lance

    uri, opts = out.object_store(dataset)
    prev = out.read_json(LANCE_STATS)["merge_state"]["shards"]
    fresh = [k for k in sorted(keep) if keep[k].get("commit") != prev.get(k) and keep[k]["lance"]["rows"]]
    if not fresh and set(prev) == set(keep):  # the shards the version was made of, each as committed then
        return current, {"mode": "merge", "shards_compared": 0, "upserted": 0, "deleted": 0, "committed": False}
    cols = [f.name for f in current.schema]
    upserts = []
    for k in fresh:
        for new in _read_fragments(uri, opts, keep[k]["lance"]):
            cur = current.to_table(columns=cols, filter=pc.field("id").isin(new.column("id")))
            upserts.append(new.select(cols).filter(changed_rows(new.select(cols), cur)))
    source = pa.concat_tables(upserts).cast(current.schema) if upserts else current.schema.empty_table()
    gone, found_by = removed_ids(out, current, keep, prev, removed)
    counts = {"mode": "merge", "shards_compared": len(fresh), "upserted": source.num_rows, "deleted": len(gone),
              "deleted_ids_from": found_by}
    if not source.num_rows and not gone:
        return current, {**counts, "committed": False}
    if source.num_rows:
        builder = current.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
        if gone:
            builder = builder.when_not_matched_by_source_delete(_id_filter(gone))
        builder.execute(source)
    else:
        current.delete(_id_filter(gone))
    ds = lance.dataset(uri, storage_options=opts)
    logger.info("lance: %s version %d merged by id: %d row(s) inserted or updated, %d deleted, the rest kept in "
                "their fragments", out.url(dataset), ds.version, source.num_rows, len(gone))
    return ds, {**counts, "committed": True}
