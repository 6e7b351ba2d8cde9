// A conformance client in Node.js: the `http` module, as a Node program
// makes its requests.
//
//   node http_client.js SCENARIO HOST PORT CELL N FILE RATE
//
// SCENARIO is one of small, download, upload, rst-blocked, rst-mid,
// slow-reader; N is the size it moves, FILE holds the bytes an upload sends
// (its first N), RATE the reading rate in bytes per second (0: as fast as
// possible). It prints one line, the format of
// tests/clients/conformance/client.py, and exits 0:
//
//   RESULT STATUS BYTES SHA256 DETAIL
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const http = require('http');

const [scenario, host, port, cell, nArg, file, rateArg] = process.argv.slice(2);
const n = Number(nArg);
const rate = Number(rateArg);

const hash = crypto.createHash('sha256');
let got = 0;
const start = Date.now();
let ended = false;
// The socket's own error: a reset shows here as `read ECONNRESET`, while the
// request and response report any early end as ECONNRESET ("socket hang up",
// "aborted"), a clean close included.
let socket = null;
let socketError = null;

function finish(status, detail) {
  if (ended) return;
  ended = true;
  const d = String(detail).split(/\s+/).join(' ') || '-';
  process.stdout.write(`RESULT ${status} ${got} ${hash.digest('hex')} ${d}\n`, () => process.exit(0));
}

function failed(where, err) {
  // Decide once the socket has closed: its error, which tells a reset from
  // a close, comes before its 'close' event, but may come after the
  // request's or the response's own report.
  const decide = () => {
    const e = socketError || err;
    let status = 'error';
    // A body cut short is `aborted` (code ECONNRESET) for a reset as well as
    // for a close: libuv takes EPOLLHUP after a short read for the end of
    // the stream and never reads the reset behind the last data, over plain
    // TCP too. So mid-body, that is what a Node app knows of a reset; before
    // any response, a close is "socket hang up" and a reset a read error.
    if (e.code === 'ECONNRESET' && (e.syscall === 'read' || e.message === 'aborted')) status = 'reset';
    else if (e.code === 'EAGAIN') status = 'eagain';
    else if (e.code === 'ECONNRESET') status = 'eof';
    finish(status, `${where}: ${e.code || ''} ${e.message}`);
  };
  if (socket === null || socket.closed) setImmediate(decide);
  else socket.once('close', () => setImmediate(decide));
}

const base = `/c/${cell}/`;
const paths = {
  small: base + 'small',
  download: base + `download/${n}`,
  'slow-reader': base + `download/${n}`,
  upload: base + 'upload',
  'rst-blocked': base + 'reset-idle',
  'rst-mid': base + `reset-mid/${n}`,
};

const upload = scenario === 'upload';
const req = http.request({
  host,
  port: Number(port),
  path: paths[scenario],
  method: upload ? 'POST' : 'GET',
  agent: false,
  headers: upload ? { 'Content-Length': n } : {},
});
req.on('socket', (s) => {
  socket = s;
  s.on('error', (e) => { socketError = e; });
});
req.on('error', (e) => failed('request', e));
req.on('response', (res) => {
  if (res.statusCode !== 200) {
    finish('error', `status ${res.statusCode}`);
    return;
  }
  const length = res.headers['content-length'] === undefined ? -1 : Number(res.headers['content-length']);
  res.on('data', (chunk) => {
    hash.update(chunk);
    got += chunk.length;
    if (rate > 0) {
      const ahead = start + (got * 1000) / rate - Date.now();
      if (ahead > 0) {
        res.pause();
        setTimeout(() => res.resume(), ahead);
      }
    }
  });
  res.on('error', (e) => failed('response', e));
  res.on('end', () => {
    if (length >= 0 && got < length) finish('eof', `read: clean EOF after ${got} of ${length} body bytes`);
    else finish('ok', '-');
  });
  res.on('close', () => {
    if (!res.complete) failed('response', Object.assign(new Error('aborted'), { code: 'ECONNRESET' }));
  });
});
if (upload) {
  fs.createReadStream(file, { start: 0, end: n - 1 }).pipe(req);
} else {
  req.end();
}
