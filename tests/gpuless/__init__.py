"""The GPU code, checked without a GPU (issue 13): ``bash tests/gpuless/run.sh``.

* :mod:`.sass` reads compiled code: SASS instruction counts, registers, spills, shared memory and
  vector widths of a cubin (cuobjdump), for a Triton kernel compiled ahead of time or a csrc/ file.
* :mod:`.triton_aot` compiles every Triton kernel variant for sm_90 and sm_80 and writes result rows.
* :mod:`.csrc_resources` does the same for csrc/ with ``nvcc --resource-usage``.
* :mod:`.extension` (run in the CUDA-torch virtual environment) loads the built ``fastsam._C`` and
  calls every cuda-backend function on fake CUDA tensors.
* :mod:`.report` merges the rows, applies the rules and writes ``bench/results/gpuless_resources.csv``.
"""
