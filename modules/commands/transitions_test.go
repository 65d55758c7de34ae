package commands

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/orknode/ork/protocols/envelope"
)

// TestTransition has one row per ordered pair of states (plus unknown names): exactly the pairs listed legal
// are allowed.
func TestTransition(t *testing.T) {
	legal := map[[2]string]bool{
		{Queued, Dispatched}:    true,
		{Queued, Cancelled}:     true,
		{Queued, Failed}:        true,
		{Dispatched, Executing}: true,
		{Dispatched, Queued}:    true,
		{Dispatched, Failed}:    true,
		{Executing, Success}:    true,
		{Executing, Failed}:     true,
		{Executing, Timeout}:    true,
		{Executing, Queued}:     true,
	}
	all := append(append([]string{}, States...), "BOGUS", "")
	rows := 0
	for _, from := range all {
		for _, to := range all {
			rows++
			t.Run(fmt.Sprintf("%s→%s", from, to), func(t *testing.T) {
				err := Transition(from, to)
				if legal[[2]string{from, to}] {
					assert.NoError(t, err)
					return
				}
				require.Error(t, err)
				assert.ErrorIs(t, err, ErrIllegalTransition)
				var te *TransitionError
				require.ErrorAs(t, err, &te)
				assert.Equal(t, from, te.From)
				assert.Equal(t, to, te.To)
			})
		}
	}
	assert.Equal(t, 81, rows)
	for _, s := range []string{Success, Failed, Timeout, Cancelled} {
		assert.Empty(t, transitions[s], "%s is terminal", s)
		assert.True(t, isTerminal(s))
		assert.True(t, envelope.IsTerminalState(s), "agrees with envelope")
	}
	for _, s := range []string{Queued, Dispatched, Executing} {
		assert.False(t, isTerminal(s))
		assert.False(t, envelope.IsTerminalState(s))
	}
}

func TestStepNamesTheCommand(t *testing.T) {
	r := Record{CommandID: "c1", State: Success}
	err := step(&r, Queued, 5)
	assert.EqualError(t, err, "ork/commands: command c1: illegal transition SUCCESS → QUEUED")
	assert.Equal(t, Success, r.State, "an illegal transition is not applied")
	assert.Zero(t, r.UpdatedAt)
}

func rec(state string, mod ...func(*Record)) Record {
	r := Record{CommandID: "c1", State: state, DeviceID: "d1", WorkerID: "w1", Command: "reboot", Retries: 2, Attempts: 1, Delivered: true}
	for _, f := range mod {
		f(&r)
	}
	return r
}

func TestDispatchRecord(t *testing.T) {
	r, err := dispatchRecord(rec(Queued, func(r *Record) { r.Delivered = false; r.Error = "x" }), "w2", 7)
	require.NoError(t, err)
	assert.Equal(t, Dispatched, r.State)
	assert.True(t, r.Delivered, "delivered is written before the send")
	assert.Equal(t, 2, r.Attempts)
	assert.Equal(t, "w2", r.WorkerID)
	assert.Empty(t, r.Error)
	assert.EqualValues(t, 7, r.UpdatedAt)

	r, err = dispatchRecord(rec(Queued), "", 7)
	require.NoError(t, err)
	assert.Equal(t, "w1", r.WorkerID, "no owner: keep the record's")

	_, err = dispatchRecord(rec(Executing), "", 7)
	assert.ErrorIs(t, err, ErrIllegalTransition)
}

func TestOnReply(t *testing.T) {
	tests := []struct {
		name      string
		reply     Reply
		wantState string
		wantRes   string
		wantErr   string
	}{
		{"success with result", Reply{Status: Success, Result: json.RawMessage(`{"a":1}`)}, Success, `{"a":1}`, ""},
		{"success without result", Reply{Status: Success}, Success, `{}`, ""},
		{"failed with error", Reply{Status: Failed, Error: "ERR_DEVICE_UNAVAILABLE: off"}, Failed, "", "ERR_DEVICE_UNAVAILABLE: off"},
		{"failed without error", Reply{Status: Failed}, Failed, "", envelope.CodeCommandFailed},
		{"garbage status is a failure", Reply{Status: "WHATEVER"}, Failed, "", envelope.CodeCommandFailed},
		{"UNKNOWN to a send is a failure", Reply{Status: envelope.StatusUnknown}, Failed, "", envelope.CodeCommandFailed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := onReply(rec(Executing), tt.reply, 9)
			require.NoError(t, err)
			assert.Equal(t, tt.wantState, r.State)
			assert.Equal(t, tt.wantRes, string(r.Result))
			assert.Equal(t, tt.wantErr, r.Error)
			assert.EqualValues(t, 9, r.UpdatedAt)
		})
	}
	_, err := onReply(rec(Queued), Reply{Status: Success}, 9)
	assert.ErrorIs(t, err, ErrIllegalTransition)
}

func TestResendDecisions(t *testing.T) {
	resolveBy := time.UnixMilli(1000)
	tests := []struct {
		name        string
		f           func(Record) (Record, action, error)
		in          Record
		wantAct     action
		wantState   string
		wantRetries int
		wantErr     string
	}{
		{"not delivered, budget left", func(r Record) (Record, action, error) { return onNotDelivered(r, 10) },
			rec(Executing), actRequeue, Queued, 1, ""},
		{"not delivered, no budget", func(r Record) (Record, action, error) { return onNotDelivered(r, 10) },
			rec(Executing, func(r *Record) { r.Retries = 0; r.Attempts = 4 }), actFinish, Failed, 0,
			"ERR_MAX_RETRIES_EXHAUSTED: not delivered after 4 attempts"},
		{"not delivered past the deadline", func(r Record) (Record, action, error) { return onNotDelivered(r, 10) },
			rec(Executing, func(r *Record) { r.Deadline = 10 }), actFinish, Failed, 2, "ERR_COMMAND_EXPIRED: not delivered"},
		{"not delivered from DISPATCHED", func(r Record) (Record, action, error) { return onNotDelivered(r, 10) },
			rec(Dispatched), actRequeue, Queued, 1, ""},
		{"status SUCCESS", func(r Record) (Record, action, error) {
			return onStatus(r, Reply{Status: Success, Result: json.RawMessage(`1`)}, resolveBy, 10)
		}, rec(Executing), actFinish, Success, 2, ""},
		{"status FAILED", func(r Record) (Record, action, error) {
			return onStatus(r, Reply{Status: Failed, Error: "ERR_X"}, resolveBy, 10)
		}, rec(Executing), actFinish, Failed, 2, "ERR_X"},
		{"status UNKNOWN, budget left: resend", func(r Record) (Record, action, error) {
			return onStatus(r, Reply{Status: envelope.StatusUnknown}, resolveBy, 10)
		}, rec(Executing), actRequeue, Queued, 1, ""},
		{"status UNKNOWN, no budget", func(r Record) (Record, action, error) {
			return onStatus(r, Reply{Status: envelope.StatusUnknown}, resolveBy, 10)
		}, rec(Executing, func(r *Record) { r.Retries = 0 }), actFinish, Failed, 0,
			"ERR_MAX_RETRIES_EXHAUSTED: worker never saw it after 1 attempts"},
		{"status UNKNOWN past the deadline", func(r Record) (Record, action, error) {
			return onStatus(r, Reply{Status: envelope.StatusUnknown}, resolveBy, 10)
		}, rec(Executing, func(r *Record) { r.Deadline = 5 }), actFinish, Failed, 2, "ERR_COMMAND_EXPIRED: worker never saw it"},
		{"status still running, before resolveBy", func(r Record) (Record, action, error) {
			return onStatus(r, Reply{Status: Executing}, resolveBy, 10)
		}, rec(Executing), actRetryStatus, Executing, 2, ""},
		{"status still running, at resolveBy", func(r Record) (Record, action, error) {
			return onStatus(r, Reply{Status: Executing}, resolveBy, 1000)
		}, rec(Executing), actFinish, Timeout, 2, "ERR_COMMAND_OUTCOME_UNKNOWN: no answer from worker w1"},
		{"status error before resolveBy", func(r Record) (Record, action, error) {
			return onStatusError(r, resolveBy, 999)
		}, rec(Executing), actRetryStatus, Executing, 2, ""},
		{"status error at resolveBy", func(r Record) (Record, action, error) {
			return onStatusError(r, resolveBy, 1000)
		}, rec(Executing), actFinish, Timeout, 2, "ERR_COMMAND_OUTCOME_UNKNOWN: no answer from worker w1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, act, err := tt.f(tt.in)
			require.NoError(t, err)
			assert.Equal(t, tt.wantAct, act, "action %s", act)
			assert.Equal(t, tt.wantState, r.State)
			assert.Equal(t, tt.wantRetries, r.Retries)
			assert.Equal(t, tt.wantErr, r.Error)
		})
	}
}

func TestEndRecords(t *testing.T) {
	r, err := expireRecord(rec(Queued), 3)
	require.NoError(t, err)
	assert.Equal(t, Failed, r.State)
	assert.Equal(t, envelope.CodeCommandExpired, r.Error)

	r, err = cancelRecord(rec(Queued), 3)
	require.NoError(t, err)
	assert.Equal(t, Cancelled, r.State)
	assert.Equal(t, envelope.CodeCancelled, r.Error)

	r, err = timeoutRecord(rec(Executing), 3)
	require.NoError(t, err)
	assert.Equal(t, Timeout, r.State)
	assert.Equal(t, "ERR_COMMAND_OUTCOME_UNKNOWN: no answer from worker w1", r.Error)

	for _, s := range []string{Dispatched, Executing, Success, Timeout} {
		_, err := cancelRecord(rec(s), 3)
		assert.ErrorIs(t, err, ErrIllegalTransition, "cancel from %s", s)
	}
	_, err = expireRecord(rec(Success), 3)
	assert.ErrorIs(t, err, ErrIllegalTransition)
	_, err = timeoutRecord(rec(Queued), 3)
	assert.ErrorIs(t, err, ErrIllegalTransition)
}

func TestRecoverRecord(t *testing.T) {
	parent := func(r *Record) { r.Children = []string{"a", "b"}; r.DeviceID = "" }
	undelivered := func(r *Record) { r.Delivered = false }
	tests := []struct {
		name      string
		in        Record
		want      recovery
		wantState string
	}{
		{"QUEUED stays queued", rec(Queued), recQueue, Queued},
		{"QUEUED delivered earlier stays queued", rec(Queued, func(r *Record) { r.Delivered = true }), recQueue, Queued},
		{"DISPATCHED not delivered", rec(Dispatched, undelivered), recQueue, Queued},
		{"EXECUTING not delivered", rec(Executing, undelivered), recQueue, Queued},
		{"DISPATCHED delivered", rec(Dispatched), recUnknown, Executing},
		{"EXECUTING delivered", rec(Executing), recUnknown, Executing},
		{"parent", rec(Executing, parent, undelivered), recParent, Executing},
		{"SUCCESS leftover", rec(Success), recFinish, Success},
		{"FAILED leftover", rec(Failed), recFinish, Failed},
		{"TIMEOUT leftover", rec(Timeout), recFinish, Timeout},
		{"CANCELLED leftover", rec(Cancelled), recFinish, Cancelled},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, what, err := recoverRecord(tt.in, 50)
			require.NoError(t, err)
			assert.Equal(t, tt.want, what)
			assert.Equal(t, tt.wantState, r.State)
			assert.Equal(t, tt.in.Retries, r.Retries, "recovery spends no retry")
		})
	}
}

func TestParentOutcome(t *testing.T) {
	p := Record{CommandID: "p", State: Executing, Children: []string{"a", "b", "c"}}
	r, err := parentOutcome(p, childSummary{Total: 3, Success: 3}, 4)
	require.NoError(t, err)
	assert.Equal(t, Success, r.State)
	assert.JSONEq(t, `{"total":3,"success":3,"failed":0,"timeout":0,"cancelled":0}`, string(r.Result))
	assert.Empty(t, r.Error)

	s := childSummary{Total: 4}
	for _, st := range []string{Success, Failed, Timeout, Cancelled} {
		s.add(st)
	}
	assert.Equal(t, 4, s.done())
	r, err = parentOutcome(p, s, 4)
	require.NoError(t, err)
	assert.Equal(t, Failed, r.State)
	assert.Equal(t, "ERR_COMMAND_FAILED: 3 of 4 children did not succeed (failed 1, timeout 1, cancelled 1)", r.Error)
	assert.JSONEq(t, `{"total":4,"success":1,"failed":1,"timeout":1,"cancelled":1}`, string(r.Result))
}

func TestBackoff(t *testing.T) {
	base, maxD := 100*time.Millisecond, time.Second
	top := func(n int64) int64 { return n - 1 }
	zero := func(int64) int64 { return 0 }
	tests := []struct {
		n      int
		jitter func(int64) int64
		want   time.Duration
	}{
		{0, top, 100 * time.Millisecond},
		{1, top, 100 * time.Millisecond},
		{2, top, 200 * time.Millisecond},
		{3, top, 400 * time.Millisecond},
		{4, top, 800 * time.Millisecond},
		{5, top, time.Second},
		{50, top, time.Second},
		{1, zero, 50 * time.Millisecond},
		{4, zero, 400 * time.Millisecond},
		{50, zero, 500 * time.Millisecond},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, backoff(tt.n, base, maxD, tt.jitter), "n=%d", tt.n)
	}
	for range 1000 {
		d := backoff(3, base, maxD, nil)
		assert.GreaterOrEqual(t, d, 200*time.Millisecond)
		assert.LessOrEqual(t, d, 400*time.Millisecond)
	}
}

func TestRecordJSON(t *testing.T) {
	r := Record{
		CommandID: "c1", State: Queued, Scope: "device", DeviceID: "d1", WorkerID: "w1", Command: "reboot",
		Params: json.RawMessage(`{"x":1}`), RequesterID: "r", Retries: 3, Deadline: 0, CreatedAt: 1, UpdatedAt: 2,
	}
	b, err := json.Marshal(r)
	require.NoError(t, err)
	assert.JSONEq(t, `{"commandId":"c1","state":"QUEUED","scope":"device","deviceId":"d1","workerId":"w1",
		"command":"reboot","params":{"x":1},"requesterId":"r","retries":3,"attempts":0,"deadline":0,
		"delivered":false,"createdAt":1,"updatedAt":2}`, string(b))
	got, err := decode("c1", b)
	require.NoError(t, err)
	assert.Equal(t, r, got)

	_, err = decode("x", []byte(`{"state":"NOPE"}`))
	assert.Error(t, err)
	_, err = decode("x", []byte(`{`))
	assert.Error(t, err)
	got, err = decode("from-key", []byte(`{"state":"QUEUED"}`))
	require.NoError(t, err)
	assert.Equal(t, "from-key", got.CommandID)

	st := (&Record{CommandID: "c", State: Success, Command: "x", Children: []string{"a"}}).CommandStatus()
	assert.Equal(t, envelope.ScopeDevice, st.Scope)
	assert.Equal(t, []string{"a"}, st.Children)
}

func TestOptions(t *testing.T) {
	ok := func(o *Options) {}
	tests := []struct {
		name    string
		mod     func(*Options)
		wantErr string
	}{
		{"defaults", ok, ""},
		{"no WAL", func(o *Options) { o.WAL = nil }, "Options.WAL is required"},
		{"no Sender", func(o *Options) { o.Sender = nil }, "Options.Sender is required"},
		{"negative retries", func(o *Options) { o.MaxRetries = Retries(-1) }, "Options.MaxRetries -1 is negative"},
		{"negative timeout", func(o *Options) { o.CommandTimeout = -1 }, "Options.CommandTimeout"},
		{"negative depth", func(o *Options) { o.QueueDepth = -1 }, "Options.QueueDepth"},
		{"negative concurrency", func(o *Options) { o.Concurrency = -3 }, "Options.Concurrency"},
		{"negative TTL", func(o *Options) { o.ResultTTL = -time.Second }, "Options.ResultTTL"},
		{"backoff above cap", func(o *Options) { o.RetryBackoff = time.Minute; o.MaxBackoff = time.Second }, "Options.MaxBackoff"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := Options{WAL: newFakeWAL(), Sender: newFakeSender()}
			tt.mod(&o)
			m, err := New(o)
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				assert.Nil(t, m)
				return
			}
			require.NoError(t, err)
			defer m.Close()
			assert.Equal(t, DefaultMaxRetries, *m.o.MaxRetries)
			assert.Equal(t, DefaultCommandTimeout, m.o.CommandTimeout)
			assert.Equal(t, DefaultQueueDepth, m.q.MaxDepth())
			assert.Equal(t, DefaultResultTTL, m.o.ResultTTL)
			assert.Equal(t, DefaultConcurrency, m.o.Concurrency)
		})
	}
	n := 0
	o := Options{WAL: newFakeWAL(), Sender: newFakeSender(), MaxRetries: Retries(n)}
	m, err := New(o)
	require.NoError(t, err)
	defer m.Close()
	assert.Equal(t, 0, *m.o.MaxRetries, "zero retries honoured")
}
