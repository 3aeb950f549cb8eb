// Command client drives taskd through Go's standard net/rpc/jsonrpc client only, the way the
// original GoTask client and any Go program would: string and struct arguments, bool and
// struct replies, error strings, and pipelined concurrent calls on one connection.
//
// Usage: client -addr HOST:PORT [-token TOKEN] -prefix NAME
// It prints "OK" and exits 0 when every check passed; otherwise it prints what failed and
// exits 1. It leaves one unit, PREFIX-kept, for the caller to inspect.
package main

import (
	"errors"
	"flag"
	"fmt"
	"net/rpc"
	"net/rpc/jsonrpc"
	"os"
	"strings"
	"time"
)

// Definition is a unit definition with the daemon's snake_case field names.
type Definition struct {
	Name        string            `json:"name"`
	Command     []string          `json:"command,omitempty"`
	Every       string            `json:"every,omitempty"`
	Paused      bool              `json:"paused,omitempty"`
	Env         map[string]string `json:"env,omitempty"`
	Description string            `json:"description,omitempty"`
}

// RunInfo is the part of a run the client looks at.
type RunInfo struct {
	ID      int64  `json:"id"`
	Unit    string `json:"unit"`
	State   string `json:"state"`
	Trigger string `json:"trigger"`
}

// UnitInfo is the reply of Add, Get, Edit, Pause and Resume.
type UnitInfo struct {
	Name          string     `json:"name"`
	State         string     `json:"state"`
	Definition    Definition `json:"definition"`
	NextFire      *string    `json:"next_fire"`
	LastRun       *RunInfo   `json:"last_run"`
	RunsTotal     uint64     `json:"runs_total"`
	FailuresTotal uint64     `json:"failures_total"`
	CreatedAt     string     `json:"created_at"`
	UpdatedAt     string     `json:"updated_at"`
}

// Summary is one element of TaskUnit.List's reply.
type Summary struct {
	Name  string `json:"name"`
	State string `json:"state"`
}

// ListArg is TaskUnit.List's argument.
type ListArg struct {
	NameGlob string `json:"name_glob,omitempty"`
}

// Status is the part of Daemon.Status the client looks at.
type Status struct {
	Version string `json:"version"`
	Auth    string `json:"auth"`
}

func main() {
	addr := flag.String("addr", "127.0.0.1:3333", "daemon address")
	token := flag.String("token", "", "the daemon's token; empty with --auth none")
	prefix := flag.String("prefix", "go", "prefix of the unit names this run creates")
	flag.Parse()
	if err := run(*addr, *token, *prefix); err != nil {
		fmt.Println("FAIL:", err)
		os.Exit(1)
	}
	fmt.Println("OK")
}

func run(addr, token, prefix string) error {
	client, err := jsonrpc.Dial("tcp", addr)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer client.Close()

	if token != "" {
		var list []Summary
		err := client.Call("TaskUnit.List", ListArg{}, &list)
		if err == nil || !strings.Contains(err.Error(), "unauthorized") {
			return fmt.Errorf("List before Auth.Login: want an unauthorized error, got %v", err)
		}
		var ok bool
		if err := client.Call("Auth.Login", "wrong-"+token, &ok); err == nil {
			return errors.New("Auth.Login with a wrong token succeeded")
		}
		if err := client.Call("Auth.Login", token, &ok); err != nil || !ok {
			return fmt.Errorf("Auth.Login: ok=%v err=%v", ok, err)
		}
	}

	// The GoTask form: a bare name, a bool reply.
	tick := prefix + "-tick"
	var added bool
	if err := client.Call("TaskUnit.Add", tick, &added); err != nil || !added {
		return fmt.Errorf("Add %q: reply=%v err=%v", tick, added, err)
	}

	// A struct definition, the unit info as reply.
	job := prefix + "-job"
	def := Definition{Name: job, Command: []string{"true"}, Every: "1h", Paused: true,
		Env: map[string]string{"GREETING": "hi"}}
	var info UnitInfo
	if err := client.Call("TaskUnit.Add", def, &info); err != nil {
		return fmt.Errorf("Add %q: %w", job, err)
	}
	if info.Name != job || info.State != "paused" || info.Definition.Every != "1h" ||
		info.Definition.Env["GREETING"] != "hi" || len(info.Definition.Command) != 1 ||
		info.NextFire != nil || info.LastRun != nil {
		return fmt.Errorf("Add %q: unexpected unit info %+v", job, info)
	}
	for _, t := range []string{info.CreatedAt, info.UpdatedAt} {
		if _, err := time.Parse(time.RFC3339, t); err != nil {
			return fmt.Errorf("Add %q: time %q: %w", job, t, err)
		}
	}

	// A unit the caller checks afterwards.
	kept := prefix + "-kept"
	var keptInfo UnitInfo
	err = client.Call("TaskUnit.Add",
		Definition{Name: kept, Command: []string{"true"}, Every: "1h", Paused: true, Description: "from Go"},
		&keptInfo)
	if err != nil || keptInfo.Name != kept {
		return fmt.Errorf("Add %q: %+v %v", kept, keptInfo, err)
	}

	var list []Summary
	if err := client.Call("TaskUnit.List", ListArg{NameGlob: prefix + "-*"}, &list); err != nil {
		return fmt.Errorf("List: %w", err)
	}
	seen := map[string]bool{}
	for _, s := range list {
		seen[s.Name] = true
	}
	if len(list) != 3 || !seen[tick] || !seen[job] || !seen[kept] {
		return fmt.Errorf("List: want %s, %s and %s, got %+v", tick, job, kept, list)
	}

	// A nil argument goes out as [null]: the methods with an optional argument take it.
	var all []Summary
	if err := client.Call("TaskUnit.List", nil, &all); err != nil || len(all) < 3 {
		return fmt.Errorf("List(nil): %d units, err %v", len(all), err)
	}
	var st Status
	if err := client.Call("Daemon.Status", nil, &st); err != nil || st.Version == "" {
		return fmt.Errorf("Status(nil): %+v %v", st, err)
	}
	wantAuth := "none"
	if token != "" {
		wantAuth = "token"
	}
	if st.Auth != wantAuth {
		return fmt.Errorf("Status: auth %q, want %q", st.Auth, wantAuth)
	}

	// Errors arrive as rpc.ServerError strings; the connection stays usable.
	var ghost UnitInfo
	err = client.Call("TaskUnit.Get", prefix+"-ghost", &ghost)
	var serverErr rpc.ServerError
	if !errors.As(err, &serverErr) || !strings.Contains(err.Error(), `unit "`+prefix+`-ghost" not found`) {
		return fmt.Errorf("Get of an unknown unit: want a not-found ServerError, got %T %v", err, err)
	}
	if err := client.Call("TaskUnit.Add", job, &added); err == nil || !strings.Contains(err.Error(), "already exists") {
		return fmt.Errorf("Add of an existing unit: want already exists, got %v", err)
	}
	if err := client.Call("TaskUnit.Add", Definition{Name: prefix + "-bad", Every: "soon", Command: []string{"true"}}, &info); err == nil ||
		!strings.HasPrefix(err.Error(), "every:") {
		return fmt.Errorf("Add with a bad every: want an error naming the field, got %v", err)
	}
	if err := client.Call("No.Such", "x", &added); err == nil {
		return errors.New("an unknown method succeeded")
	}

	// Pipelined concurrent calls on the one connection, replies matched by id.
	const n = 32
	calls := make([]*rpc.Call, 0, 2*n)
	for i := 0; i < n; i++ {
		calls = append(calls, client.Go("TaskUnit.Get", job, new(UnitInfo), nil))
		calls = append(calls, client.Go("Daemon.Status", struct{}{}, new(Status), nil))
	}
	errCall := client.Go("TaskUnit.Delete", prefix+"-ghost", new(bool), nil)
	for _, c := range calls {
		<-c.Done
		if c.Error != nil {
			return fmt.Errorf("pipelined %s: %w", c.ServiceMethod, c.Error)
		}
		switch r := c.Reply.(type) {
		case *UnitInfo:
			if r.Name != job {
				return fmt.Errorf("pipelined Get: reply for %q", r.Name)
			}
		case *Status:
			if r.Version == "" {
				return errors.New("pipelined Status: no version")
			}
		}
	}
	<-errCall.Done
	if errCall.Error == nil || !strings.Contains(errCall.Error.Error(), "not found") {
		return fmt.Errorf("pipelined Delete of an unknown unit: %v", errCall.Error)
	}

	var deleted bool
	for _, name := range []string{tick, job} {
		deleted = false
		if err := client.Call("TaskUnit.Delete", name, &deleted); err != nil || !deleted {
			return fmt.Errorf("Delete %q: reply=%v err=%v", name, deleted, err)
		}
	}
	list = nil
	if err := client.Call("TaskUnit.List", ListArg{NameGlob: prefix + "-*"}, &list); err != nil {
		return fmt.Errorf("List after Delete: %w", err)
	}
	if len(list) != 1 || list[0].Name != kept {
		return fmt.Errorf("List after Delete: want only %s, got %+v", kept, list)
	}
	return nil
}
