"""Expert paging on a real GPU: tiers, staging pool, prefetch, and the codec of the compressed tier."""
