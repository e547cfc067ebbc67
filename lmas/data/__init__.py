"""Tasks, streams and task builders (see :mod:`lmas.data.sources`)."""
