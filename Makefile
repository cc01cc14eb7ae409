# relay — see README.md. Every target works on a fresh Debian 12 machine
# after `.ci/run`'s installs (make test) or as root (make demo).
GO       ?= go
VERSION  ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
BUILD    := CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)'
PKGS     := ./...
TESTFLAGS ?= -count=1 -timeout 20m

.PHONY: all build test test-race test-short lint vet fmt generate generate-check demo bench cross clean fuzz

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

# Each hand-written parser's fuzz target for FUZZTIME (CI: 60s each):
# ClientHello, PROXY header, the h2 server's frame sequence, the HTTP/1
# proxy loop's request reader.
FUZZTIME ?= 60s
fuzz:
	for f in FuzzClientHello FuzzParseProxyHeader FuzzH2Frames FuzzH1Request; do \
		$(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) ./relay || exit 1; done

# Compile check for the CPUs home routers use.
cross:
	GOOS=linux GOARCH=amd64 $(BUILD) -o /dev/null ./cmd/relayctl
	GOOS=linux GOARCH=arm64 $(BUILD) -o /dev/null ./cmd/relayctl
	GOOS=linux GOARCH=arm GOARM=7 $(BUILD) -o /dev/null ./cmd/relayctl
	GOOS=linux GOARCH=mips GOMIPS=softfloat $(BUILD) -o /dev/null ./cmd/relayctl
	GOOS=linux GOARCH=mipsle GOMIPS=softfloat $(BUILD) -o /dev/null ./cmd/relayctl

clean:
	rm -rf bin
