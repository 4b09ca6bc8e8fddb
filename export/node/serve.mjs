#!/usr/bin/env node
// A tiny HTTP endpoint around an exported zmdevice model (node:http, no framework).
//
//   node serve.mjs export/NAME.onnx [--port 8080] [--host 127.0.0.1] [--top-k 3]
//
//   GET  /          -> {"model", "modality", "classes"}
//   POST /classify  -> {"predictions": [{"top", "probabilities", "logits"}]}
//        text model:  body {"texts": ["...", ...]} or {"text": "..."} (application/json)
//        image model: the image file itself as the body (PNG or JPEG bytes)
//
// Prints `listening on http://HOST:PORT` once it accepts requests.

import http from 'node:http';

import { classify, decodeImage, loadModel } from './model.mjs';

const MAX_BODY_BYTES = 20 * 1024 * 1024;

function option(name, fallback) {
  const at = process.argv.indexOf(name);
  return at > 0 ? process.argv[at + 1] : fallback;
}

function readBody(request) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    request.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) reject(new Error('request body over 20 MB'));
      else chunks.push(chunk);
    });
    request.on('end', () => resolve(Buffer.concat(chunks)));
    request.on('error', reject);
  });
}

function reply(response, status, body) {
  response.writeHead(status, { 'content-type': 'application/json' });
  response.end(JSON.stringify(body));
}

/** The inputs a request carries, for this model's modality. */
function requestInputs(model, body) {
  if (model.modality === 'image') return [decodeImage(body)];
  const json = JSON.parse(body.toString('utf8'));
  const texts = json.texts ?? (json.text !== undefined ? [json.text] : null);
  if (!Array.isArray(texts) || !texts.every((t) => typeof t === 'string')) {
    throw new Error('send {"text": "..."} or {"texts": ["...", ...]}');
  }
  return texts;
}

const modelPath = process.argv[2];
if (!modelPath || modelPath.startsWith('--')) {
  console.error('usage: node serve.mjs MODEL.onnx [--port 8080] [--host 127.0.0.1] [--top-k 3]');
  process.exit(2);
}
const model = await loadModel(modelPath);
const topK = Math.min(Number(option('--top-k', 3)), model.classes.length);

const server = http.createServer(async (request, response) => {
  try {
    if (request.method === 'GET' && request.url === '/') {
      reply(response, 200, { model: model.name, modality: model.modality, classes: model.classes });
    } else if (request.method === 'POST' && request.url === '/classify') {
      const inputs = requestInputs(model, await readBody(request));
      reply(response, 200, { predictions: await classify(model, inputs, { topK }) });
    } else {
      reply(response, 404, { error: 'GET / or POST /classify' });
    }
  } catch (error) {
    reply(response, 400, { error: error.message });
  }
});
const host = option('--host', '127.0.0.1');
server.listen(Number(option('--port', 8080)), host, () => {
  console.log(`listening on http://${host}:${server.address().port}`);
});
