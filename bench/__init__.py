"""edgezo's benchmarks, a package so that its modules (common, kernels, report, ...) never shadow an installed
package of the same name: run each from the checkout's root as `python -m bench.NAME` (bench/README.md)."""
