// Command ork-node is the ORK node daemon and its command line.
package main

import (
	"context"
	"os"

	"github.com/orknode/ork/internal/cli"
)

func main() {
	os.Exit(cli.Main(context.Background(), os.Args[1:], &cli.Env{Stdout: os.Stdout, Stderr: os.Stderr, Getenv: os.Getenv}))
}
