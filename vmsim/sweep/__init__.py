"""Fleet-scale scenario sweeps: many migrations, one per point of a grid, run on Dask.

* ``spec``: the sweep file (TOML): a base scenario, axes, seeds, an optional ``[fleet]`` and
  ``[evacuation]``; expands into points, each one complete scenario text (no Dask needed).
* ``store``: the Parquet layout of the results (one row per run) and resuming.
* ``run``: sends the points to a Dask cluster (a ``LocalCluster`` or a scheduler's address),
  collects the rows, shows progress. Imports Dask; only ``balloon-hint sweep`` imports it.
* ``evacuation``: the host evacuation model (N VMs over one shared link, k at a time).
* ``report``: summary tables and plots of a results folder.
"""
