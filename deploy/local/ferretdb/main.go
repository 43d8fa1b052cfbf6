// Command waypost-ferretdb runs FerretDB (MongoDB wire protocol) on PostgreSQL for local runs and tests.
// It embeds the published github.com/FerretDB/FerretDB/ferretdb package, which sidesteps the
// generated version files that a plain `go install` of FerretDB's own command requires.
// deploy/local/stack.py builds it with the ferretdb_no_sqlite tag and starts PostgreSQL first.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen-addr", "127.0.0.1:27017", "TCP address to listen on")
	postgresURL := flag.String(
		"postgresql-url", "postgres://ferretdb@127.0.0.1:5432/ferretdb", "PostgreSQL connection URL",
	)
	poolSize := flag.Int("pool-max-conns", 80, "most PostgreSQL connections FerretDB holds")
	logLevel := flag.String("log-level", "warn", "debug, info, warn or error")
	flag.Parse()

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "bad -log-level: %s\n", err)
		os.Exit(2)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	uri, err := poolURL(*postgresURL, *poolSize)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bad -postgresql-url: %s\n", err)
		os.Exit(2)
	}

	f, err := ferretdb.New(&ferretdb.Config{
		Listener:      ferretdb.ListenerConfig{TCP: *listen},
		Logger:        logger,
		Handler:       "postgresql",
		PostgreSQLURL: uri,
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "start: %s\n", err)
		os.Exit(1)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	logger.Warn("listening", "addr", *listen, "uri", f.MongoDBURI(), "postgresql", redacted(uri))
	if err := f.Run(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "run: %s\n", err)
		os.Exit(1)
	}
}

// poolURL adds the pgx pool settings FerretDB does not choose well for us, unless the URL sets them.
//
// Every MongoDB command holds a pooled connection while it runs, and an open cursor holds one until
// it is exhausted, killed or its client disconnects. A command waiting for a connection has no
// deadline of its own (only find, aggregate and findAndModify honour maxTimeMS). So the pool must
// be large enough for many open cursors yet stay below PostgreSQL's max_connections (a restarted
// FerretDB must find room while the old one's connections close), and a connection that died with
// a PostgreSQL restart must be dropped instead of handed out.
func poolURL(raw string, poolSize int) (string, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return "", err
	}
	q := u.Query()
	defaults := map[string]string{
		"pool_max_conns": fmt.Sprint(poolSize),
		// dialling a PostgreSQL that is down or restarting fails within this many seconds
		"connect_timeout": "5",
		// idle connections are checked (and dead ones dropped) this often; pgx also pings any
		// connection idle for over a second before handing it out
		"pool_health_check_period": "5s",
	}
	for key, value := range defaults {
		if !q.Has(key) {
			q.Set(key, value)
		}
	}
	u.RawQuery = q.Encode()
	return u.String(), nil
}

// redacted hides a password in the URL for the log line.
func redacted(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable)"
	}
	return u.Redacted()
}
