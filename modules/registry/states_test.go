package registry

import (
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestTransitionTable checks the table in code against the lifecycle written out here, pair by pair.
func TestTransitionTable(t *testing.T) {
	legal := map[[2]string]bool{
		{Unregistered, Discovered}:  true, // first discovery
		{Discovered, Discovered}:    true, // a step failed again, retry
		{Discovered, IdentitySaved}: true, // identity answered (also rediscovery after a restart)
		{Discovered, Terminated}:    true, // operator evicts a Worker that never came back
		{IdentitySaved, Discovered}: true, // capabilities failed or invalid, retry
		{IdentitySaved, Ready}:      true, // contract accepted
		{IdentitySaved, Terminated}: true,
		{Ready, Discovered}:         true, // a registration step failed, retry
		{Ready, IdentitySaved}:      true, // re-identify
		{Ready, Terminated}:         true,
		{Terminated, Discovered}:    true, // discovered again: re-registers
	}
	n := 0
	for _, from := range States {
		for _, to := range States {
			n++
			assert.Equal(t, legal[[2]string{from, to}], CanTransition(from, to), "%s → %s", from, to)
		}
	}
	assert.Equal(t, 25, n)
	assert.False(t, CanTransition("BOGUS", Discovered))
	assert.False(t, CanTransition(Discovered, "BOGUS"))
}

// TestTransitions drives every from × to pair through the Registry: each legal pair by the event that takes
// it, each illegal pair by the event that would (or, for → UNREGISTERED, by noting no event targets it).
func TestTransitions(t *testing.T) {
	ctx := context.Background()
	discover := func(r *Registry) (Change, error) { return r.Discovered(peer1) }
	identify := func(r *Registry) (Change, error) {
		return r.IdentitySaved(ctx, peer1, identity(worker1, dev("dev-1"), dev("dev-3")))
	}
	ready := func(r *Registry) (Change, error) { return r.Ready(ctx, peer1, validContract()) }
	failed := func(r *Registry) (Change, error) { return r.Failed(ctx, peer1, "capabilities timed out") }
	terminate := func(r *Registry) (Change, error) { return r.Terminate(ctx, worker1) }

	rows := []struct {
		from, to string
		setup    func(*fixture, *testing.T) // default: reach(from)
		event    func(*Registry) (Change, error)
		wantErr  error // nil: legal
	}{
		// Legal.
		{from: Unregistered, to: Discovered, event: discover},
		{from: Discovered, to: Discovered, event: failed},
		{from: Discovered, to: IdentitySaved, event: identify},
		{from: Discovered, to: Terminated, setup: (*fixture).discoveredWithID, event: terminate},
		{from: IdentitySaved, to: Discovered, event: failed},
		{from: IdentitySaved, to: Ready, event: ready},
		{from: IdentitySaved, to: Terminated, event: terminate},
		{from: Ready, to: Discovered, event: failed},
		{from: Ready, to: IdentitySaved, event: identify},
		{from: Ready, to: Terminated, event: terminate},
		{from: Terminated, to: Discovered, event: discover},
		// Illegal.
		{from: Unregistered, to: Unregistered},
		{from: Unregistered, to: IdentitySaved, event: identify, wantErr: ErrIllegalTransition},
		{from: Unregistered, to: Ready, event: ready, wantErr: ErrIllegalTransition},
		{from: Unregistered, to: Terminated, event: terminate, wantErr: ErrUnknownWorker},
		{from: Discovered, to: Unregistered},
		{from: Discovered, to: Ready, event: ready, wantErr: ErrIllegalTransition},
		{from: IdentitySaved, to: Unregistered},
		{from: IdentitySaved, to: IdentitySaved, event: identify, wantErr: ErrIllegalTransition},
		{from: Ready, to: Unregistered},
		{from: Ready, to: Ready, event: ready, wantErr: ErrIllegalTransition},
		{from: Terminated, to: Unregistered},
		{from: Terminated, to: IdentitySaved, event: identify, wantErr: ErrIllegalTransition},
		{from: Terminated, to: Ready, event: ready, wantErr: ErrIllegalTransition},
		{from: Terminated, to: Terminated, event: terminate, wantErr: ErrIllegalTransition},
	}
	covered := map[[2]string]bool{}
	for _, row := range rows {
		covered[[2]string{row.from, row.to}] = true
		t.Run(row.from+"→"+row.to, func(t *testing.T) {
			legal := row.wantErr == nil && row.event != nil
			require.Equal(t, legal, CanTransition(row.from, row.to), "row disagrees with the table")
			if row.event == nil {
				return // no event targets UNREGISTERED: a known peer is never forgotten by a transition
			}
			f := newFixture(t)
			if row.setup != nil {
				row.setup(f, t)
			} else {
				f.reach(t, row.from)
			}
			before, _ := f.r.ByPeer(peer1)
			c, err := row.event(f.r)
			if legal {
				require.NoError(t, err)
				assert.Equal(t, row.from, c.From)
				assert.Equal(t, row.to, c.To)
				assert.Equal(t, row.to, f.state(peer1))
				assert.Equal(t, []Change{c}, f.takeChanges(), "OnChange gets exactly the change")
				return
			}
			require.ErrorIs(t, err, row.wantErr)
			var te *TransitionError
			if errors.As(err, &te) {
				assert.Equal(t, row.from, te.From)
				assert.Equal(t, row.to, te.To)
			}
			assert.Equal(t, c.From, c.To, "a refused event reports no change")
			after, _ := f.r.ByPeer(peer1)
			assert.Equal(t, before, after, "a refused event changes nothing")
			assert.Empty(t, f.takeChanges())
		})
	}
	for _, from := range States {
		for _, to := range States {
			assert.True(t, covered[[2]string{from, to}], "no row for %s → %s", from, to)
		}
	}
}

// TestOtherTransitionTriggers covers the legal pairs that more than one event takes.
func TestOtherTransitionTriggers(t *testing.T) {
	ctx := context.Background()
	bad := identity(worker1, dev("")) // a device without an id
	rows := []struct {
		name     string
		from, to string
		event    func(*Registry) (Change, error)
		wantErr  error
	}{
		{"invalid identity from DISCOVERED", Discovered, Discovered,
			func(r *Registry) (Change, error) { return r.IdentitySaved(ctx, peer1, bad) }, ErrInvalidIdentity},
		{"invalid identity from READY", Ready, Discovered,
			func(r *Registry) (Change, error) { return r.IdentitySaved(ctx, peer1, bad) }, ErrInvalidIdentity},
		{"invalid contract", IdentitySaved, Discovered,
			func(r *Registry) (Change, error) { return r.Ready(ctx, peer1, nil) }, ErrInvalidContract},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			f := newFixture(t)
			f.reach(t, row.from)
			c, err := row.event(f.r)
			require.ErrorIs(t, err, row.wantErr)
			assert.Equal(t, Change{PeerID: peer1, WorkerID: c.WorkerID, From: row.from, To: row.to, Conflicts: c.Conflicts, Error: err.Error()}, c)
			v, _ := f.r.ByPeer(peer1)
			assert.Equal(t, row.to, v.State)
			assert.Equal(t, err.Error(), v.LastError)
			assert.Nil(t, v.Contract)
			assert.Equal(t, []Change{c}, f.takeChanges())
		})
	}
}

// TestDiscoveredIsIdempotent: rediscovering a registered peer changes nothing and notifies nobody.
func TestDiscoveredIsIdempotent(t *testing.T) {
	for _, state := range []string{Discovered, IdentitySaved, Ready} {
		t.Run(state, func(t *testing.T) {
			f := newFixture(t)
			f.reach(t, state)
			before, _ := f.r.ByPeer(peer1)
			c, err := f.r.Discovered(peer1)
			require.NoError(t, err)
			assert.Equal(t, state, c.From)
			assert.Equal(t, state, c.To)
			assert.False(t, c.Changed())
			after, _ := f.r.ByPeer(peer1)
			assert.Equal(t, before, after)
			assert.Empty(t, f.takeChanges())
		})
	}
}

// TestFailedRules: Failed needs a known peer, and does not revive a terminated Worker.
func TestFailedRules(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	_, err := f.r.Failed(ctx, "nobody", "x")
	require.ErrorIs(t, err, ErrUnknownWorker)

	f.reach(t, Terminated)
	c, err := f.r.Failed(ctx, peer1, "late failure of a pipeline run")
	require.ErrorIs(t, err, ErrIllegalTransition)
	assert.Equal(t, Terminated, c.To)
	assert.Equal(t, Terminated, f.state(peer1))
	assert.Empty(t, f.takeChanges())

	_, err = f.r.Discovered("")
	require.ErrorIs(t, err, ErrEmptyPeerID)
	_, err = f.r.IdentitySaved(ctx, "", identity(worker1))
	require.ErrorIs(t, err, ErrEmptyPeerID)
	_, err = f.r.Ready(ctx, "", validContract())
	require.ErrorIs(t, err, ErrEmptyPeerID)
	_, err = f.r.Failed(ctx, "", "x")
	require.ErrorIs(t, err, ErrEmptyPeerID)
}

func TestTransitionErrorText(t *testing.T) {
	f := newFixture(t)
	f.reach(t, Ready)
	_, err := f.r.Ready(context.Background(), peer1, validContract())
	require.EqualError(t, err, "ork/registry: illegal transition: Ready: worker-1 (peer-1) READY → READY")
}
