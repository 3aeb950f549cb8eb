// Command client is a taskd client in Go with the standard library's net/rpc/jsonrpc only:
// it logs in (Auth.Login), adds a unit, follows its run's output by reading the log as it
// grows (Run.Logs from the last offset: net/rpc has no subscriptions), and deletes the unit.
//
//	TASKD_ADDR=127.0.0.1:3333 TASKD_TOKEN=$(cat ~/.local/state/taskd/token) go run .
//
// It exits 0 if the run succeeded.
package main

import (
	"fmt"
	"net/rpc/jsonrpc"
	"os"
	"strings"
	"time"
)

// Definition is a unit definition (the daemon's snake_case field names).
type Definition struct {
	Name    string   `json:"name"`
	Command []string `json:"command,omitempty"`
}

// RunInfo is the part of a run this client reads.
type RunInfo struct {
	ID       int64  `json:"id"`
	State    string `json:"state"`
	ExitCode *int   `json:"exit_code"`
}

// UnitInfo is TaskUnit.Add's reply, in part.
type UnitInfo struct {
	Name    string   `json:"name"`
	LastRun *RunInfo `json:"last_run"`
}

// LogsArg is Run.Logs's argument.
type LogsArg struct {
	ID     int64  `json:"id"`
	Stream string `json:"stream,omitempty"`
	Offset uint64 `json:"offset"`
}

// LogsResult is Run.Logs's reply.
type LogsResult struct {
	Data       string `json:"data"`
	NextOffset uint64 `json:"next_offset"`
	EOF        bool   `json:"eof"`
	Active     bool   `json:"active"`
}

func main() {
	addr := os.Getenv("TASKD_ADDR")
	if addr == "" {
		addr = "127.0.0.1:3333"
	}
	client, err := jsonrpc.Dial("tcp", addr)
	if err != nil {
		fail(err)
	}
	defer client.Close()
	if token := os.Getenv("TASKD_TOKEN"); token != "" {
		var ok bool
		if err := client.Call("Auth.Login", token, &ok); err != nil {
			fail(err)
		}
	}
	name := "example-go"
	var unit UnitInfo
	def := Definition{Name: name, Command: []string{"sh", "-c", "echo hello from go; echo to stderr >&2"}}
	if err := client.Call("TaskUnit.Add", def, &unit); err != nil {
		fail(err)
	}
	if unit.LastRun == nil {
		fail(fmt.Errorf("unit %s has no run", name))
	}
	id := unit.LastRun.ID
	// Each stream read from where the last read ended, until the run is over and read whole.
	offsets := map[string]uint64{"stdout": 0, "stderr": 0}
	prefix := map[string]string{"stdout": "out", "stderr": "err"}
	for {
		done := true
		for _, stream := range []string{"stdout", "stderr"} {
			var logs LogsResult
			if err := client.Call("Run.Logs", LogsArg{ID: id, Stream: stream, Offset: offsets[stream]}, &logs); err != nil {
				fail(err)
			}
			for _, line := range strings.Split(strings.TrimSuffix(logs.Data, "\n"), "\n") {
				if line != "" {
					fmt.Printf("%s: %s\n", prefix[stream], line)
				}
			}
			offsets[stream] = logs.NextOffset
			done = done && !logs.Active && logs.EOF
		}
		if done {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	var run RunInfo
	if err := client.Call("Run.Get", id, &run); err != nil {
		fail(err)
	}
	code := "none"
	if run.ExitCode != nil {
		code = fmt.Sprint(*run.ExitCode)
	}
	fmt.Printf("run %d %s, exit code %s\n", id, run.State, code)
	var deleted bool
	if err := client.Call("TaskUnit.Delete", name, &deleted); err != nil {
		fail(err)
	}
	if run.State != "succeeded" {
		os.Exit(1)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "taskd:", err)
	os.Exit(1)
}
