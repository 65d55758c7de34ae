// Package archtest enforces the package arrows of DESIGN §2 with `go list -deps`.
package archtest

import (
	"bufio"
	"bytes"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const mod = "github.com/orknode/ork/"

// rule: packages under from may not depend (directly or not) on any package
// whose path has one of the forbidden prefixes, except the allowed ones.
type rule struct {
	from      string
	forbidden []string
	allowed   []string
	stdOnly   bool
}

var rules = []rule{
	{from: "protocols/envelope", stdOnly: true},
	{from: "protocols", forbidden: []string{mod + "modules", mod + "store", mod + "node", mod + "worker", mod + "client"}},
	{from: "modules", forbidden: []string{"github.com/libp2p", mod + "store", mod + "node", mod + "protocols", mod + "internal/p2p", mod + "worker"}, allowed: []string{mod + "protocols/envelope"}},
	{from: "store", forbidden: []string{mod + "modules", mod + "protocols", mod + "node", "github.com/libp2p"}},
	{from: "worker", forbidden: []string{mod + "node", mod + "modules", mod + "store", mod + "client"}},
	{from: "client", forbidden: []string{mod + "node", mod + "modules", mod + "store", mod + "worker"}},
}

type pkg struct {
	path     string
	standard bool
}

func deps(t *testing.T, pattern string) map[string][]pkg {
	t.Helper()
	out, err := exec.Command("go", "list", "-e", "-f", "{{.ImportPath}}", pattern).Output()
	require.NoError(t, err)
	res := map[string][]pkg{}
	for _, p := range strings.Fields(string(out)) {
		if strings.HasSuffix(p, "_test") || strings.Contains(p, "/archtest") {
			continue
		}
		d, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}} {{.Standard}}", p).Output()
		require.NoError(t, err, "go list -deps %s", p)
		sc := bufio.NewScanner(bytes.NewReader(d))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) == 2 && f[0] != p {
				res[p] = append(res[p], pkg{f[0], f[1] == "true"})
			}
		}
	}
	return res
}

func TestPackageArrows(t *testing.T) {
	for _, r := range rules {
		t.Run(r.from, func(t *testing.T) {
			all := deps(t, "../../"+r.from+"/...")
			if len(all) == 0 {
				t.Skipf("no packages under %s yet", r.from)
			}
			for p, ds := range all {
				for _, d := range ds {
					if r.stdOnly {
						require.Truef(t, d.standard, "%s must use the standard library only, imports %s", p, d.path)
						continue
					}
					if d.standard || allowed(d.path, r.allowed) {
						continue
					}
					for _, f := range r.forbidden {
						require.Falsef(t, strings.HasPrefix(d.path, f), "%s must not depend on %s (DESIGN §2)", p, d.path)
					}
				}
			}
		})
	}
}

func allowed(p string, prefixes []string) bool {
	for _, a := range prefixes {
		if p == a || strings.HasPrefix(p, a+"/") {
			return true
		}
	}
	return false
}
