// Package logging gives each subsystem a *slog.Logger that follows whatever
// handler slog.Default has at the time of the call, so a main that installs its
// handler after package init still sees every subsystem's logs.
package logging

import (
	"context"
	"log/slog"
)

// Logger returns the logger of one subsystem, tagged "sub"=name.
func Logger(name string) *slog.Logger {
	return slog.New(&handler{attrs: []slog.Attr{slog.String("sub", name)}})
}

type handler struct {
	attrs  []slog.Attr
	groups []string
}

func (h *handler) target() slog.Handler {
	t := slog.Default().Handler()
	for _, g := range h.groups {
		t = t.WithGroup(g)
	}
	if len(h.attrs) > 0 {
		t = t.WithAttrs(h.attrs)
	}
	return t
}

func (h *handler) Enabled(ctx context.Context, l slog.Level) bool {
	return slog.Default().Handler().Enabled(ctx, l)
}

func (h *handler) Handle(ctx context.Context, r slog.Record) error {
	return h.target().Handle(ctx, r)
}

func (h *handler) WithAttrs(as []slog.Attr) slog.Handler {
	n := *h
	n.attrs = append(append([]slog.Attr(nil), h.attrs...), as...)
	return &n
}

func (h *handler) WithGroup(g string) slog.Handler {
	n := *h
	n.groups = append(append([]string(nil), h.groups...), g)
	return &n
}
