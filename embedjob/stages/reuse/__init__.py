"""Reuse by content (``output.reuse: auto``): a rerun encodes only new and changed documents.

What lives where:

* ``hashes.py`` — the content hash of a document's text (``text_hash``, stored in ``vectors/``)
  and the partition of an id;
* ``lookup.py`` — before encoding: a hash join, partition by partition in Ray tasks, of the new
  shards' (id, text_hash) with those of the committed outputs they replace; per new shard, a plan
  of the rows whose vectors are copied (``_tmp/_reuse/<run>/plan/<shard>/<partition>.parquet``);
* ``copy.py`` — in a shard's commit task: the planned rows read from their old files (vectors,
  tokens, chunks) and merged, in row order, with the rows encoded this run;
* ``stage.py`` — the driver's side: which old commits may serve, the plan, the counts.
"""
