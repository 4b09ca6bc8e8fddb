#!/usr/bin/env node
// A tiny HTTP endpoint around an exported zmdevice model (node:http, no framework).
//
//   node serve.mjs export/NAME.onnx [--port 8080] [--host 127.0.0.1] [--top-k 3]
//        [--max-items 64] [--max-concurrent 4] [--max-body-mb 20] [--timeout-s 30]
//
//   GET  /          -> {"model", "modality", "classes"}
//   POST /classify  -> {"predictions": [{"top", "probabilities", "logits"}]}
//        text model:  body {"texts": ["...", ...]} or {"text": "..."} (application/json)
//        image model: the image file itself as the body (image/png, image/jpeg or
//                     application/octet-stream; PNG or JPEG bytes)
//
// Errors are {"error": "one line"} with 400 (bad input: an image that does not decode or
// declares more than MAX_IMAGE_PIXELS, a body that is not UTF-8 or not JSON, JSON nested
// deeper than MAX_JSON_DEPTH, both "text" and "texts", an item that is not a string),
// 404, 408 (body not received within --timeout-s), 413 (body over --max-body-mb, more
// than --max-items texts), 415 (wrong content type), 429 (--max-concurrent requests
// already in flight) or 500. A request whose body is refused unread is answered at once
// and its connection closed.
// Startup errors are one line on stderr and exit code 2.
//
// Prints `listening on http://HOST:PORT` once it accepts requests.

import http from 'node:http';

import { classify, decodeImage, InputError, loadModel } from './model.mjs';

const USAGE =
  'usage: node serve.mjs MODEL.onnx [--port 8080] [--host 127.0.0.1] [--top-k 3] ' +
  '[--max-items 64] [--max-concurrent 4] [--max-body-mb 20] [--timeout-s 30]';

/** Flag -> [option name, default, smallest value, largest value, integer only]. */
const FLAGS = {
  '--port': ['port', 8080, 0, 65535, true],
  '--host': ['host', '127.0.0.1'],
  '--top-k': ['topK', 3, 1, Infinity, true],
  '--max-items': ['maxItems', 64, 1, Infinity, true], // texts per request
  '--max-concurrent': ['maxConcurrent', 4, 1, Infinity, true], // POST /classify in flight
  '--max-body-mb': ['maxBodyMb', 20, 1e-6, Infinity, false],
  '--timeout-s': ['timeoutS', 30, 0.001, Infinity, false], // to receive one request
};

const IMAGE_TYPES = ['image/png', 'image/jpeg', 'application/octet-stream'];

/** A reply other than 200: its status and a one-line message. */
class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function parseArguments(argv) {
  const options = Object.fromEntries(Object.values(FLAGS).map(([name, fallback]) => [name, fallback]));
  const positional = [];
  for (let i = 0; i < argv.length; i++) {
    if (!argv[i].startsWith('--')) {
      positional.push(argv[i]);
      continue;
    }
    const flag = FLAGS[argv[i]];
    if (!flag || i + 1 >= argv.length) throw new Error(USAGE);
    const [name, , min, max, integer] = flag;
    const text = argv[++i];
    if (min === undefined) {
      options[name] = text;
      continue;
    }
    const value = Number(text);
    if (text.trim() === '' || !(value >= min && value <= max) || (integer && !Number.isInteger(value))) {
      const range = max === Infinity ? `${integer ? 'an integer' : 'a number'} >= ${min}` : `an integer from ${min} to ${max}`;
      throw new Error(`${argv[i - 1]} must be ${range}, not '${text}'`);
    }
    options[name] = value;
  }
  if (positional.length !== 1) throw new Error(USAGE);
  return { ...options, model: positional[0] };
}

/** The media type of a content-type header, lower case, without parameters. */
function mediaType(header) {
  return (header ?? '').split(';')[0].trim().toLowerCase();
}

/**
 * The request body, at most maxBytes, within timeoutMs. Refused as soon as it is known to
 * be too large: from Content-Length before reading, or once the bytes read pass the limit.
 */
function readBody(request, response, maxBytes, timeoutMs) {
  const tooLarge = new HttpError(413, `request body over ${maxBytes} bytes (--max-body-mb)`);
  if (Number(request.headers['content-length']) > maxBytes) return Promise.reject(tooLarge);
  if (mediaType(request.headers.expect) === '100-continue') response.writeContinue();
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    let settled = false;
    const settle = (error) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (error) reject(error);
      else resolve(Buffer.concat(chunks));
    };
    const timer = setTimeout(
      () => settle(new HttpError(408, `request body not received within ${timeoutMs / 1000} s (--timeout-s)`)),
      timeoutMs,
    );
    request.on('data', (chunk) => {
      if (settled) return;
      size += chunk.length;
      if (size > maxBytes) settle(tooLarge);
      else chunks.push(chunk);
    });
    request.on('end', () => settle(null));
    request.on('error', (error) => settle(new HttpError(400, error.message)));
    request.on('close', () => settle(new HttpError(400, 'the client closed the connection')));
  });
}

/** Deepest nesting of a JSON request ({"texts": [...]} is 2); deeper bodies are refused. */
const MAX_JSON_DEPTH = 8;

/**
 * Whether a JSON body nests arrays and objects deeper than `limit`, found in one pass over
 * its bytes that jumps over strings (UTF-8 puts no ASCII byte inside a multi-byte
 * character). JSON.parse takes seconds on 20 MB of '[' and holds the event loop all the
 * while; this takes milliseconds on a body of long texts.
 */
function nestsDeeper(bytes, limit) {
  let depth = 0;
  for (let i = 0; i < bytes.length; i++) {
    const byte = bytes[i];
    if (byte === 0x22) {
      // a string: on to the quote that closes it, one after an even run of backslashes
      let end = i;
      for (;;) {
        end = bytes.indexOf(0x22, end + 1);
        if (end < 0) return false; // unterminated: JSON.parse says so
        let slashes = 0;
        while (bytes[end - 1 - slashes] === 0x5c) slashes++;
        if (slashes % 2 === 0) break;
      }
      i = end;
    } else if (byte === 0x5b || byte === 0x7b) {
      if (++depth > limit) return true;
    } else if (byte === 0x5d || byte === 0x7d) {
      depth--;
    }
  }
  return false;
}

// fatal: bytes that are not UTF-8 are refused, not replaced by U+FFFD (a leading BOM is dropped)
const UTF8 = new TextDecoder('utf-8', { fatal: true });

/** The inputs a request body carries, for this model's modality. */
function requestInputs(model, body, maxItems) {
  if (model.modality === 'image') return [decodeImage(body)];
  if (nestsDeeper(body, MAX_JSON_DEPTH)) {
    throw new HttpError(400, `JSON nested deeper than ${MAX_JSON_DEPTH} levels: send {"texts": ["...", ...]}`);
  }
  let text;
  try {
    text = UTF8.decode(body);
  } catch {
    throw new HttpError(400, 'the body is not UTF-8 text');
  }
  let json;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw new HttpError(400, `malformed JSON: ${error.message}`);
  }
  if (json?.texts !== undefined && json?.text !== undefined) {
    throw new HttpError(400, 'send "text" or "texts", not both');
  }
  const texts = json?.texts ?? (json?.text !== undefined ? [json.text] : null);
  if (!Array.isArray(texts)) throw new HttpError(400, 'send {"text": "..."} or {"texts": ["...", ...]}');
  if (texts.length > maxItems) {
    throw new HttpError(413, `${texts.length} texts in one request, at most ${maxItems} (--max-items)`);
  }
  const bad = texts.findIndex((text) => typeof text !== 'string');
  if (bad >= 0) throw new HttpError(400, `text ${bad} is ${texts[bad] === null ? 'null' : typeof texts[bad]}, not a string`);
  return texts;
}

function reply(request, response, status, body) {
  if (response.headersSent || response.destroyed) return;
  const headers = { 'content-type': 'application/json' };
  // A body refused before its end is not read on: the connection closes after the reply.
  if (!request.complete) headers.connection = 'close';
  response.writeHead(status, headers);
  response.end(JSON.stringify(body));
}

function createServer(model, options) {
  const timeoutMs = options.timeoutS * 1000;
  const topK = Math.min(options.topK, model.classes.length);
  const accepted = model.modality === 'text' ? ['application/json'] : IMAGE_TYPES;
  let inFlight = 0;

  async function classifyRequest(request, response) {
    const type = mediaType(request.headers['content-type']);
    if (!accepted.includes(type)) {
      throw new HttpError(415, `content-type '${type}' for a ${model.modality} model: send ${accepted.join(' or ')}`);
    }
    const body = await readBody(request, response, options.maxBodyMb * 1024 * 1024, timeoutMs);
    const inputs = requestInputs(model, body, options.maxItems);
    return { predictions: await classify(model, inputs, { topK }) };
  }

  async function handle(request, response) {
    try {
      if (request.method === 'GET' && request.url === '/') {
        reply(request, response, 200, { model: model.name, modality: model.modality, classes: model.classes });
      } else if (request.method === 'POST' && request.url === '/classify') {
        if (inFlight >= options.maxConcurrent) {
          throw new HttpError(429, `${inFlight} requests in flight, at most ${options.maxConcurrent} (--max-concurrent)`);
        }
        inFlight++;
        response.on('close', () => inFlight--);
        reply(request, response, 200, await classifyRequest(request, response));
      } else {
        reply(request, response, 404, { error: 'GET / or POST /classify' });
      }
    } catch (error) {
      const status = error instanceof HttpError ? error.status : error instanceof InputError ? 400 : 500;
      reply(request, response, status, { error: String(error.message).split('\n')[0] });
    }
  }

  const server = http.createServer(
    {
      // Node answers 408 and closes a connection whose headers (or whole request) take
      // longer; it checks every connectionsCheckingInterval, 30 s unless set.
      headersTimeout: timeoutMs,
      requestTimeout: timeoutMs,
      connectionsCheckingInterval: Math.min(1000, timeoutMs),
    },
    handle,
  );
  // Expect: 100-continue is answered by readBody, after the checks that may refuse the body.
  server.on('checkContinue', handle);
  return server;
}

function listen(server, port, host) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
}

async function main() {
  const options = parseArguments(process.argv.slice(2));
  const model = await loadModel(options.model);
  const server = createServer(model, options);
  try {
    await listen(server, options.port, options.host);
  } catch (error) {
    throw new Error(`cannot listen on ${options.host}:${options.port}: ${error.code ?? error.message}`);
  }
  server.on('error', (error) => console.error(`error: ${error.message}`));
  console.log(`listening on http://${options.host}:${server.address().port}`);
}

main().catch((error) => {
  console.error(`error: ${String(error.message).split('\n')[0]}`);
  process.exit(2);
});
