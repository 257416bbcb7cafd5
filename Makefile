# The README's two commands. PIP_CONSTRAINT pins torch to the 2.13.0 CPU wheel so no dependency pulls a CUDA build.
PYTHON ?= python3
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: install demo test

install:
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[dev]"

# the main job: stream a video from the embedded default model (the world model in models/world/weights)
demo: install
	$(PYTHON) -m framecast.stream.cli generate --prompt "a cyan triangle on snow at dusk in snowfall" \
		--switch "90:a yellow diamond on grass by day in rain" --actions random --frames 180 -o out/demo.mp4

# the tests, inside a loopback-only network namespace when we may create one (root), so nothing leaves the machine
test: install
	@if [ "$$(id -u)" = 0 ] && command -v unshare >/dev/null && unshare -n true 2>/dev/null; then \
		unshare -n sh -c 'ip link set lo up 2>/dev/null; exec $(PYTHON) -m pytest -q'; \
	else \
		$(PYTHON) -m pytest -q; \
	fi
