package store

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	ds "github.com/ipfs/go-datastore"
	"github.com/stretchr/testify/require"
)

// benchValue is a ~200-byte command record, the size of a typical WAL entry.
var benchValue = []byte(`{"commandId":"6f1c2a9e-3b7d-4e52-9a0f-8c1d2e3f4a5b","deviceId":"miner-0042",` +
	`"workerId":"12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo","action":"setPowerMode",` +
	`"params":{"mode":"low"},"state":"DISPATCHED"}`)

// BenchmarkWALAppend measures synced appends on disk with 1 and 64 concurrent writers; b.N is the total
// number of appends, shared among the writers.
func BenchmarkWALAppend(b *testing.B) {
	for _, writers := range []int{1, 64} {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
			s := openStore(b, b.TempDir())
			ctx, w := b.Context(), s.WAL()
			b.SetBytes(int64(len(benchValue)))
			b.ReportAllocs()

			var next atomic.Int64
			var wg sync.WaitGroup
			errs := make(chan error, writers)
			b.ResetTimer()
			for range writers {
				wg.Go(func() {
					for {
						i := next.Add(1)
						if i > int64(b.N) {
							return
						}
						if err := w.Append(ctx, fmt.Sprintf("cmd-%09d", i), benchValue); err != nil {
							errs <- err
							return
						}
					}
				})
			}
			wg.Wait()
			b.StopTimer()
			close(errs)
			require.NoError(b, <-errs)

			st, secs := w.Stats(), b.Elapsed().Seconds()
			b.ReportMetric(float64(st.Appends)/secs, "appends/s")
			b.ReportMetric(float64(st.Syncs)/secs, "syncs/s")
			b.ReportMetric(float64(st.Appends)/float64(st.Syncs), "appends/sync")
		})
	}
}

// BenchmarkWALSync is the floor under every WAL write: one single-op batch committed (and so fsynced) straight
// on the LevelDB, without the WAL.
func BenchmarkWALSync(b *testing.B) {
	s := openStore(b, b.TempDir())
	ctx, d := b.Context(), s.Datastore()
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		batch, err := d.Batch(ctx)
		require.NoError(b, err)
		require.NoError(b, batch.Put(ctx, ds.NewKey(fmt.Sprintf("/wal/cmd-%09d", i)), benchValue))
		require.NoError(b, batch.Commit(ctx))
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "syncs/s")
}
