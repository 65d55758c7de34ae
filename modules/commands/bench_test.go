package commands

import (
	"context"
	"encoding/json"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// instantSender answers every send with SUCCESS at once.
type instantSender struct{}

var okResult = json.RawMessage(`{"ok":true}`)

func (instantSender) Send(context.Context, Record) (Reply, error) {
	return Reply{Status: Success, Result: okResult}, nil
}

func (instantSender) Status(context.Context, Record) (Reply, error) {
	return Reply{Status: Success}, nil
}

// benchWAL is an in-memory WAL that keeps live records and only counts results (a real WAL keeps them on
// disk; holding 10⁶ results in the Go heap would measure the garbage collector, not the Manager).
type benchWAL struct {
	mu      sync.Mutex
	wal     map[string][]byte
	results int
}

func (w *benchWAL) Put(_ context.Context, id string, b []byte) error {
	w.mu.Lock()
	w.wal[id] = b
	w.mu.Unlock()
	return nil
}

func (w *benchWAL) Finish(_ context.Context, id string, b []byte) error {
	w.mu.Lock()
	delete(w.wal, id)
	w.results++
	w.mu.Unlock()
	return nil
}

func (w *benchWAL) Sweep(context.Context, func(string, []byte) error) error { return nil }
func (w *benchWAL) Result(context.Context, string) ([]byte, error)          { return nil, ErrNotFound }
func (w *benchWAL) ExpireResults(context.Context, time.Time) (int, error)   { return 0, nil }

// BenchmarkSubmitToDone measures the Manager's own cost per command, from Submit to the terminal write and
// OnDone, over an in-memory WAL and a Sender that answers at once (so it excludes fsync and network): the
// figure to hold against the node's budget of ≤ 0.3 ms CPU per command.
//
//   - parallel: 16 submitters over 1024 devices, as a busy node would see them (cmds/s, cpu-µs/cmd);
//   - serial: one command at a time, Submit then wait for OnDone (latency of the pipeline).
func BenchmarkSubmitToDone(b *testing.B) {
	const devices = 1024
	names := make([]string, devices)
	for i := range names {
		names[i] = "dev-" + strconv.Itoa(i)
	}
	params := json.RawMessage(`{"mode":"eco","limit":3200}`)
	newManager := func(b *testing.B, onDone func(Record)) *Manager {
		m, err := New(Options{WAL: &benchWAL{wal: map[string][]byte{}}, Sender: instantSender{}, QueueDepth: 1 << 20, OnDone: onDone})
		if err != nil {
			b.Fatal(err)
		}
		return m
	}
	rec := func(i int) Record {
		return Record{DeviceID: names[i%devices], WorkerID: "w1", Command: "setPowerMode", Params: params, RequesterID: "bench"}
	}

	b.Run("parallel", func(b *testing.B) {
		var done atomic.Int64
		all := make(chan struct{})
		n := int64(b.N)
		m := newManager(b, func(Record) {
			if done.Add(1) == n {
				close(all)
			}
		})
		defer m.Close()
		b.ReportAllocs()
		cpu0 := cpuTime()
		start := time.Now()
		b.ResetTimer()
		var next atomic.Int64
		var wg sync.WaitGroup
		for range 16 {
			wg.Go(func() {
				for {
					i := next.Add(1) - 1
					if i >= n {
						return
					}
					if _, err := m.Submit(context.Background(), rec(int(i))); err != nil {
						b.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()
		<-all
		b.StopTimer()
		elapsed := time.Since(start)
		b.ReportMetric(float64(b.N)/elapsed.Seconds(), "cmds/s")
		if cpu := cpuTime() - cpu0; cpu > 0 {
			b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/cmd")
		}
	})

	b.Run("serial", func(b *testing.B) {
		done := make(chan Record, 1)
		m := newManager(b, func(r Record) { done <- r })
		defer m.Close()
		b.ReportAllocs()
		b.ResetTimer()
		for i := range b.N {
			if _, err := m.Submit(context.Background(), rec(i)); err != nil {
				b.Fatal(err)
			}
			if r := <-done; r.State != Success {
				b.Fatal(r.State, r.Error)
			}
		}
	})
}
