"""Where torch's CPU norm ops give wrong numbers: every op on odd but legal memory layouts
(channels-last with N = 1 or H = W = 1, batch strides a view gives) against torch's own
result on contiguous memory, float64; prints the cases that differ as a markdown table.

    PYTHONPATH=$PWD python bench/torch_layout_bugs.py

The method is in fastbn/benchmarks/torch_layouts.py; what it found on torch 2.13 is in
docs/nn.md ("Where torch is wrong").
"""
from fastbn.benchmarks.torch_layouts import main

if __name__ == "__main__":
    main()
