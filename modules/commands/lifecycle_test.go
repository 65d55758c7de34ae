package commands

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols/envelope"
)

// lifecycle is one block of testdata/lifecycles.txt.
type lifecycle struct {
	name, line   string
	opts         map[string]string
	send, status []string
	wantState    string
	want         map[string]string
	wal          []string
}

func readLifecycles(t *testing.T, path string) []*lifecycle {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	var out []*lifecycle
	var cur *lifecycle
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if name, ok := strings.CutPrefix(line, "== "); ok {
			cur = &lifecycle{name: name, line: fmt.Sprint(path, ":", n), opts: map[string]string{}, want: map[string]string{}}
			out = append(out, cur)
			continue
		}
		require.NotNil(t, cur, "%s:%d: directive before the first ==", path, n)
		fields := strings.Fields(line)
		switch fields[0] {
		case "opts":
			kv(t, fields[1:], cur.opts)
		case "send":
			cur.send = fields[1:]
		case "status":
			cur.status = fields[1:]
		case "want":
			cur.wantState = fields[1]
			kv(t, fields[2:], cur.want)
		case "wal":
			cur.wal = fields[1:]
		default:
			t.Fatalf("%s:%d: unknown directive %q", path, n, fields[0])
		}
	}
	require.NoError(t, sc.Err())
	return out
}

func kv(t *testing.T, fields []string, into map[string]string) {
	for _, f := range fields {
		k, v, ok := strings.Cut(f, "=")
		require.True(t, ok, "want key=value, got %q", f)
		into[k] = v
	}
}

// answer turns a scripted answer into the fake Worker's reply.
func answer(script []string, n int) (Reply, error) {
	a := "error"
	if len(script) > 0 {
		a = script[min(n, len(script))-1]
	}
	if a, d, ok := strings.Cut(a, "@"); ok {
		took, err := time.ParseDuration(d)
		if err != nil {
			panic(err)
		}
		time.Sleep(took) // virtual time: the bubble's clock
		return answer([]string{a}, 1)
	}
	switch a {
	case "success":
		return Reply{Status: Success, Result: []byte(`{"done":true}`)}, nil
	case "failed":
		return Reply{Status: Failed, Error: "ERR_WORKER_SAYS_NO: because"}, nil
	case "unknown":
		return Reply{Status: envelope.StatusUnknown}, nil
	case "running":
		return Reply{Status: Executing}, nil
	case "no-stream":
		return Reply{}, errNoStream
	case "no-reply":
		return Reply{}, errNoReply
	case "error":
		return Reply{}, errors.New("status: no answer")
	}
	panic("unknown answer " + a)
}

func TestLifecycles(t *testing.T) {
	for _, lc := range readLifecycles(t, "testdata/lifecycles.txt") {
		t.Run(lc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				runLifecycle(t, lc)
			})
		})
	}
}

func runLifecycle(t *testing.T, lc *lifecycle) {
	dur := func(s string) time.Duration {
		d, err := time.ParseDuration(s)
		require.NoError(t, err, lc.line)
		return d
	}
	h := newHarness(t, func(o *Options) {
		o.RetryBackoff, o.MaxBackoff = time.Second, 8*time.Second
		if v, ok := lc.opts["retries"]; ok {
			n, err := strconv.Atoi(v)
			require.NoError(t, err)
			o.MaxRetries = Retries(n)
		}
		if v, ok := lc.opts["backoff"]; ok {
			o.RetryBackoff = dur(v)
			o.MaxBackoff = max(o.MaxBackoff, o.RetryBackoff)
		}
	})
	defer h.m.Close()
	h.sender.send = func(_ context.Context, _ Record, n int) (Reply, error) { return answer(lc.send, n) }
	h.sender.status = func(_ context.Context, _ Record, n int) (Reply, error) { return answer(lc.status, n) }

	start := time.Now()
	r := dev("d1")
	if v, ok := lc.opts["deadline"]; ok {
		r.Deadline = start.Add(dur(v)).UnixMilli()
	}
	id := h.submit1(t, r).CommandID
	got := h.wait(t, id)
	elapsed := time.Since(start)

	assert.Equal(t, lc.wantState, got.State, lc.line)
	for k, v := range lc.want {
		switch k {
		case "sends":
			assert.Equal(t, v, strconv.Itoa(h.sender.sendCount(id)), "%s: sends", lc.line)
		case "statuses":
			assert.Equal(t, v, strconv.Itoa(h.sender.statusCount(id)), "%s: statuses", lc.line)
		case "attempts":
			assert.Equal(t, v, strconv.Itoa(got.Attempts), "%s: attempts", lc.line)
		case "retries":
			assert.Equal(t, v, strconv.Itoa(got.Retries), "%s: retries", lc.line)
		case "code":
			assert.Equal(t, v, envelope.ParseError(got.Error).Code, "%s: error %q", lc.line, got.Error)
		case "elapsed":
			assert.Equal(t, dur(v), elapsed, "%s: elapsed", lc.line)
		default:
			t.Fatalf("%s: unknown check %q", lc.line, k)
		}
	}
	var wal []string
	for _, op := range h.wal.opsFor(id) {
		wal = append(wal, op.Op+":"+op.State)
	}
	assert.Equal(t, lc.wal, wal, "%s: WAL writes", lc.line)
}
