"""The crawl stage: source files (URL lists, Common Crawl WAT) read into `crawl_metadata`."""
