// A taskd client in Node.js with the built-in `net` module only: raw TCP, one JSON-RPC 2.0
// value per line. It adds a unit, follows its run's output as it is written (Run.Follow), and
// deletes the unit.
//
//   TASKD_ADDR=127.0.0.1:3333 TASKD_TOKEN=$(cat ~/.local/state/taskd/token) node taskd-client.mjs
//
// Exits 0 if the run succeeded.
import net from "node:net";
import readline from "node:readline";

class Client {
  constructor(addr) {
    const i = addr.lastIndexOf(":");
    this.socket = net.connect({ host: addr.slice(0, i), port: Number(addr.slice(i + 1)) });
    this.lastId = 0;
    this.replies = new Map(); // id -> {resolve, reject}
    this.subscriptions = new Map(); // subscription id -> handler
    this.early = []; // subscription messages that came before their handler
    readline.createInterface({ input: this.socket }).on("line", (line) => this.#onMessage(JSON.parse(line)));
    this.closed = new Promise((resolve) => this.socket.on("close", resolve));
  }

  #onMessage(msg) {
    if (msg.id !== undefined && this.replies.has(msg.id)) {
      const { resolve, reject } = this.replies.get(msg.id);
      this.replies.delete(msg.id);
      msg.error ? reject(new Error(`${msg.error.code}: ${msg.error.message}`)) : resolve(msg.result);
    } else if (msg.params?.subscription !== undefined) {
      const handler = this.subscriptions.get(msg.params.subscription);
      handler ? handler(msg.params.result) : this.early.push(msg);
    }
  }

  call(method, arg) {
    const id = ++this.lastId;
    this.socket.write(JSON.stringify({ jsonrpc: "2.0", id, method, params: [arg] }) + "\n");
    return new Promise((resolve, reject) => this.replies.set(id, { resolve, reject }));
  }

  // Calls `onItem` with each Run.Follow item; resolves with the last one (the run's end).
  async follow(runId, onItem) {
    const sub = await this.call("Run.Follow", { id: runId });
    return new Promise((resolve) => {
      const handler = (item) => {
        onItem(item);
        if (item.kind !== "output") {
          this.subscriptions.delete(sub);
          resolve(item);
        }
      };
      this.subscriptions.set(sub, handler);
      for (const msg of this.early.splice(0)) this.#onMessage(msg);
    });
  }

  close() {
    this.socket.end();
  }
}

const client = new Client(process.env.TASKD_ADDR ?? "127.0.0.1:3333");
if (process.env.TASKD_TOKEN) await client.call("Auth.Login", process.env.TASKD_TOKEN);
const name = "example-node";
const unit = await client.call("TaskUnit.Add", {
  name,
  command: ["sh", "-c", "echo hello from node; echo to stderr >&2"],
});
const run = unit.last_run ?? (await client.call("Run.List", { unit: name, limit: 1 }))[0];
const end = await client.follow(run.id, (item) => {
  if (item.kind === "output") {
    // A piece holding both streams at once has no `stream`.
    const prefix = { stdout: "out", stderr: "err" }[item.stream] ?? "log";
    for (const line of item.data.split("\n").filter((l) => l !== "")) console.log(`${prefix}: ${line}`);
  } else if (item.kind === "end") {
    console.log(`run ${run.id} ${item.run.state}, exit code ${item.run.exit_code}`);
  } else {
    console.error(item.message);
  }
});
await client.call("TaskUnit.Delete", name);
client.close();
process.exitCode = end.kind === "end" && end.run.state === "succeeded" ? 0 : 1;
