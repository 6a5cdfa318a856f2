"""Cluster launchers. Importing this package never imports Ray; :mod:`lctrain.cluster.ray` does so lazily."""
