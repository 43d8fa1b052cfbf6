// Command waypost-ferretdb runs FerretDB (MongoDB wire protocol) on SQLite for local runs and tests.
// It embeds the published github.com/FerretDB/FerretDB/ferretdb package, which sidesteps the
// generated version files that a plain `go install` of FerretDB's own command requires.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen-addr", "127.0.0.1:27017", "TCP address to listen on")
	dataDir := flag.String("data-dir", "data", "directory for the SQLite databases")
	logLevel := flag.String("log-level", "warn", "debug, info, warn or error")
	flag.Parse()

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "bad -log-level: %s\n", err)
		os.Exit(2)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	dir, err := filepath.Abs(*dataDir)
	if err == nil {
		err = os.MkdirAll(dir, 0o755)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "data dir: %s\n", err)
		os.Exit(1)
	}

	f, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: *listen},
		Logger:    logger,
		Handler:   "sqlite",
		// Writers take SQLite's write lock when their transaction begins: a read transaction
		// that upgrades later fails at once with SQLITE_BUSY when several clients write.
		SQLiteURL: "file:" + dir + "/?_txlock=immediate",
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "start: %s\n", err)
		os.Exit(1)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	logger.Warn("listening", "addr", *listen, "uri", f.MongoDBURI(), "data", dir)
	if err := f.Run(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "run: %s\n", err)
		os.Exit(1)
	}
}
