# Convenience targets; each is one command from the README.
PY ?= python

.PHONY: test bench bench-all

test:            ## the README's test command
	$(PY) -m pytest -q

bench:           ## edgebundle vs the hand paths, one process (~5 min on 2 cores)
	$(PY) -m bench.compare

bench-all: bench ## every benchmark (~30 min on 2 cores)
	$(PY) -m bench.mobile
	$(PY) -m bench.calib_memory
	$(PY) -m bench.ort_formats
	$(PY) -m bench.encoder_ort
	$(PY) -m bench.openvino_vs_nncf
	$(PY) -m bench.gate
