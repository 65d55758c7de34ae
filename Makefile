# ORK node — run `make help` for the targets.
GO        ?= go
BIN       := bin
PKGS      := ./...
FUZZTIME  ?= 10s
TEST_TIMEOUT ?= 15m

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: build
build: ## Build ork-node and ork-worker-sim into ./bin
	$(GO) build -o $(BIN)/ ./cmd/...

.PHONY: test
test: ## Vet, then run every test with the race detector
	$(GO) vet $(PKGS)
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) $(PKGS)

.PHONY: bench
bench: ## Run the Go benchmarks (envelope, rpc, WAL), then the end-to-end benchmark (bench/e2e)
	$(GO) test -run '^$$' -bench . -benchmem -benchtime 2000x $(PKGS)
	$(GO) run ./bench/e2e

.PHONY: scale
scale: ## Scale run: 1,000 Workers x 10 devices join one node; READY time, RSS, CPU, reconnect storm (~3 min)
	$(GO) run ./bench/scale

.PHONY: fuzz
fuzz: ## Run every fuzz target for $(FUZZTIME) each
	@set -e; for pkg in $$($(GO) list $(PKGS)); do \
	  for t in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
	    echo "== $$pkg $$t"; $(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) $$pkg; \
	  done; \
	done

.PHONY: demo
demo: build ## Start a node and a 20-Worker x 5-device fleet on 127.0.0.1, show them READY, stop
	./scripts/demo.sh

.PHONY: lint
lint: ## gofmt check and go vet
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet $(PKGS)

.PHONY: interop
interop: ## Interop test: a js-libp2p client calls the node (needs node + npm; not part of make test)
	@command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || { \
	  echo "make interop needs Node.js (>= 20) and npm; on Debian/Ubuntu: sudo apt-get install nodejs npm" >&2; exit 1; }
	@node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' || { \
	  echo "make interop needs Node.js >= 20 (found $$(node --version))" >&2; exit 1; }
	cd interop/js && npm ci --no-audit --no-fund
	$(GO) test -tags interop -count=1 -v -timeout 5m ./interop/
