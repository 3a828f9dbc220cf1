"""fastsam benchmarks (installed as ``fastsam.bench``): kernel and end-to-end timings, baselines."""
