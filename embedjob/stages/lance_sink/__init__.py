"""The Lance sink (``output.lance``): the document vectors in a Lance dataset, ``lance/docs.lance``,
that LanceDB, DuckDB and Ray Data open.

What lives where:

* ``write.py`` — in each shard's commit task (``write.commit_shard``): the shard's rows written as
  Lance fragments (data files, not yet in any version), listed in the shard's done marker;
* ``dataset.py`` — on the driver after the per-shard stages: one new dataset version made of
  exactly the fragments the kept shards' markers list (``Overwrite``), so a retried commit, a
  rerun or a recipe change never leaves a row twice or two recipes in the latest version (older
  versions stay in Lance's history until ``cleanup_old_versions``); the optional ANN index and its
  recall@10 against exact search;
* ``merge.py`` — with ``output.reuse``, a rerun of the same recipe: its changed rows merge-inserted
  by id and the removed ids deleted, in one version over the last one (the other rows stay in
  their fragments).

Fragments a crashed or retried commit wrote but no marker lists belong to no version: Lance's
``cleanup_old_versions`` removes them with the old versions.
"""
