"""Training shards: a named subset of the dataset, resharded into shuffled webdataset tars of a fixed size."""
