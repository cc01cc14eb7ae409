# relay — see README.md. Every target works on a fresh Debian 12 machine
# after `.ci/run`'s installs (make test) or as root (make demo).
GO       ?= go
VERSION  ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
BUILD    := CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)'
PKGS     := ./...
TESTFLAGS ?= -count=1 -timeout 20m

.PHONY: all build test test-race test-short lint vet fmt generate generate-check demo bench soak cross dist clean fuzz

all: build

build:
	$(BUILD) -o bin/relayctl ./cmd/relayctl

# Tests run for real: as root they create network namespaces, iptables rules
# and BPF programs (and clean them up); as a normal user those tests skip
# and say why.
test: build
	@if [ "$$(id -u)" = 0 ]; then ./scripts/deps.sh; fi  # a fresh machine lacks iptables, curl, ...
	$(GO) test $(TESTFLAGS) $(PKGS)

# The packages with the most concurrency (relay core, sockmap splice)
# under the race detector; needs a C compiler (cgo): CI uses clang.
test-race:
	CGO_ENABLED=1 CC=$${CC:-$$(command -v gcc || command -v clang)} $(GO) test -race -count=1 -timeout 10m ./relay ./bpf

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) tool staticcheck $(PKGS)

fmt:
	gofmt -w $$(git ls-files '*.go')

# Regenerate the BPF objects and Go bindings (needs clang; users and CI's
# test run do not).
generate:
	$(GO) generate ./bpf/...

generate-check: generate
	@git diff --exit-code -- bpf/ || { echo "generated files are stale; run make generate"; exit 1; }

demo: build
	./scripts/demo.sh

bench: build
	./scripts/bench.sh $(if $(QUICK),--quick,)

# The load test (docs/BENCHMARKS.md "Soak"): the relay and HAProxy (apt-get
# installs it here when root) at once under held passthrough and terminate
# connections, slowloris, a paced 256 MiB transfer and a normal client.
# SOAK_N / SOAK_M scale it to the machine's open-file limit.
SOAK_N ?= 8000
SOAK_M ?= 500
soak: build
	@if [ "$$(id -u)" = 0 ] && ! command -v haproxy >/dev/null && command -v apt-get >/dev/null; then \
		apt-get install -y -qq --no-install-recommends haproxy >/dev/null 2>&1 || echo "soak: cannot install haproxy: relay only" >&2; fi
	$(GO) run ./scripts/loadgen soak -relay bin/relayctl -configs scripts/bench -n $(SOAK_N) -m $(SOAK_M)

# Each hand-written parser's fuzz target for FUZZTIME (CI: 60s each):
# ClientHello, PROXY header, the h2 server's frame sequence, the HTTP/1
# proxy loop's request reader, the QUIC Initial.
FUZZTIME ?= 60s
fuzz:
	for f in FuzzClientHello FuzzParseProxyHeader FuzzH2Frames FuzzH1Request FuzzQUICInitial; do \
		$(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 10s ./relay || exit 1; done

# Compile check for the CPUs home routers use.
cross:
	GOOS=linux GOARCH=amd64 $(BUILD) -o /dev/null ./cmd/relayctl
	GOOS=linux GOARCH=arm64 $(BUILD) -o /dev/null ./cmd/relayctl
	GOOS=linux GOARCH=arm GOARM=7 $(BUILD) -o /dev/null ./cmd/relayctl
	GOOS=linux GOARCH=mips GOMIPS=softfloat $(BUILD) -o /dev/null ./cmd/relayctl
	GOOS=linux GOARCH=mipsle GOMIPS=softfloat $(BUILD) -o /dev/null ./cmd/relayctl

# Release artefacts in dist/: static binaries for every router CPU, .deb
# (nfpm, a tool in go.mod), OpenWrt tarballs, SHA256SUMS; reproducible.
dist:
	VERSION=$(VERSION) ./scripts/dist.sh

clean:
	rm -rf bin dist
