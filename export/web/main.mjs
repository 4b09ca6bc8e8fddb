// Classify an image or a text in the browser with an exported zmdevice student
// (onnxruntime-web, WASM). Nothing leaves the page.
//
// Everything the page needs is inside the .onnx file: the class names, the modality and
// the preprocessing sit in the model's metadata_props, which onnxruntime-web does not
// expose, so preprocess.mjs reads them from the protobuf itself. The page shows the image
// or the text input according to zmdevice.modality. A text model also needs the tokenizer
// file written beside it (NAME.tokenizer.json), read by @huggingface/tokenizers.
//
// All preprocessing lives in preprocess.mjs, shared with the Node.js sample (../node/):
// pixels and token ids equal the Python runtime's (tests/fixtures/preprocess.json).

import { Tokenizer } from './node_modules/@huggingface/tokenizers/dist/tokenizers.min.mjs';
import * as ort from './node_modules/onnxruntime-web/dist/ort.wasm.min.mjs';
import {
  imageInput,
  parseModelMetadata,
  readMetadata,
  runFixture,
  softmax,
  textInputs,
  tokenizerFileName,
  topK,
} from './preprocess.mjs';

// Only ort-wasm-simd-threaded.{mjs,wasm} are fetched from here. One thread: several
// threads need cross-origin isolation (COOP/COEP headers) that a plain static server lacks.
ort.env.wasm.wasmPaths = new URL('./node_modules/onnxruntime-web/dist/', import.meta.url).href;
ort.env.wasm.numThreads = 1;

const TOP_K = 5;

/** Load a model from its bytes: session plus decoded zmdevice metadata. */
export async function loadModel(bytes, name) {
  const info = parseModelMetadata(readMetadata(bytes));
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ['wasm'] });
  return { name, session, tokenizer: null, ...info };
}

function result(model, logitsTensor, extra) {
  const logits = Array.from(logitsTensor.data);
  const probabilities = softmax(logits);
  const top = topK(probabilities, model.classes, model.classes.length);
  return { class: top[0].class, top, probabilities, logits, classes: model.classes, ...extra };
}

/** Classify one decoded image (ImageBitmap); shows the model's input pixels on `canvas`. */
export async function classifyImage(model, image, canvas) {
  // The image at its own size (no browser resampling), unblended: preprocess.mjs
  // composites transparent pixels on white as Python does.
  const work = document.createElement('canvas');
  work.width = image.width;
  work.height = image.height;
  const context = work.getContext('2d', { willReadFrequently: true });
  context.drawImage(image, 0, 0);
  const rgba = context.getImageData(0, 0, image.width, image.height).data;
  const input = imageInput(rgba, image.width, image.height, 4, model.preprocess);
  showPixels(canvas, input.rgb, model.preprocess.image_size);
  const outputs = await model.session.run({ pixel_values: new ort.Tensor('float32', input.data, input.dims) });
  return result(model, outputs.logits, {});
}

/** Classify one text (text model with its tokenizer loaded). */
export async function classifyText(model, text) {
  const batch = textInputs(model.tokenizer, [text], model.preprocess);
  const outputs = await model.session.run({
    input_ids: new ort.Tensor('int64', batch.ids, batch.dims),
    attention_mask: new ort.Tensor('int64', batch.mask, batch.dims),
  });
  return result(model, outputs.logits, { ids: batch.rows[0] });
}

function showPixels(canvas, rgb, size) {
  canvas.width = size;
  canvas.height = size;
  const picture = new ImageData(size, size);
  for (let i = 0, j = 0; j < rgb.length; i += 4, j += 3) {
    picture.data.set([rgb[j], rgb[j + 1], rgb[j + 2], 255], i);
  }
  canvas.getContext('2d').putImageData(picture, 0, 0);
}

async function decodeImage(blob) {
  // Pixels as stored, like PIL: no colour-profile transform, no premultiplied alpha.
  return createImageBitmap(blob, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
}

async function fetchBytes(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`cannot fetch ${url}: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

async function fetchJson(url) {
  return JSON.parse(new TextDecoder().decode(await fetchBytes(url)));
}

// ---- page wiring -------------------------------------------------------------------------
const state = { status: 'idle' };
window.zmdevice = state;
const element = (id) => document.getElementById(id);
let model = null;
let image = null;

function showModel() {
  element('model-name').textContent = `${model.name} (${model.modality}, ${model.student || 'student'}` +
    `${model.quantization ? ', int8' : ''})`;
  element('model-classes').textContent = model.classes.join(', ');
  element('model-info').hidden = false;
  element('image-input').hidden = model.modality !== 'image';
  element('text-input').hidden = model.modality !== 'text';
  element('tokenizer-input').hidden = model.modality !== 'text' || model.tokenizer !== null;
  state.model = { name: model.name, modality: model.modality, classes: model.classes };
}

function showResult(outcome) {
  const list = element('ranking');
  list.replaceChildren(
    ...outcome.top.slice(0, TOP_K).map(({ class: name, probability }) => {
      const row = document.createElement('li');
      const label = document.createElement('span');
      label.className = 'label';
      label.textContent = name;
      const bar = document.createElement('span');
      bar.className = 'bar';
      bar.style.setProperty('--p', probability.toFixed(4));
      const value = document.createElement('span');
      value.className = 'value';
      value.textContent = `${(100 * probability).toFixed(1)}%`;
      row.append(label, bar, value);
      return row;
    }),
  );
  element('status').textContent = `${outcome.class} in ${outcome.milliseconds.toFixed(1)} ms`;
}

async function run() {
  if (!model) return;
  const text = element('text').value;
  if (model.modality === 'image' && !image) return;
  if (model.modality === 'text' && (!model.tokenizer || text === '')) return;
  state.status = 'running';
  const started = performance.now();
  const outcome = model.modality === 'image' ? await classifyImage(model, image, element('canvas')) : await classifyText(model, text);
  outcome.milliseconds = performance.now() - started;
  Object.assign(state, { status: 'done', result: outcome });
  showResult(outcome);
}

function fail(error) {
  Object.assign(state, { status: 'error', error: String(error && error.message ? error.message : error) });
  element('status').textContent = `error: ${state.error}`;
}

const guarded = (action) => (event) => action(event).catch(fail);

element('model-file').addEventListener('change', guarded(async (event) => {
  const file = event.target.files[0];
  model = await loadModel(new Uint8Array(await file.arrayBuffer()), file.name);
  showModel();
  element('status').textContent = model.modality === 'text'
    ? `text model: now pick its tokenizer file ${tokenizerFileName(model.preprocess)}`
    : 'image model: pick an image';
  await run();
}));

element('tokenizer-file').addEventListener('change', guarded(async (event) => {
  model.tokenizer = new Tokenizer(JSON.parse(await event.target.files[0].text()), {});
  showModel();
  await run();
}));

element('image-file').addEventListener('change', guarded(async (event) => {
  image = await decodeImage(event.target.files[0]);
  await run();
}));

element('text').addEventListener('input', guarded(run));

// URL mode: index.html?model=URL&image=URL or ?model=URL&text=..., the tokenizer fetched
// from beside the model. ?fixture=URL&tokenizer=URL runs preprocess.mjs on the shared
// fixture instead (the tests compare its output with the Python runtime's).
const params = new URLSearchParams(window.location.search);
if (params.get('fixture')) {
  state.status = 'running';
  (async () => {
    const tokenizer = new Tokenizer(await fetchJson(params.get('tokenizer')), {});
    Object.assign(state, { status: 'done', result: runFixture(await fetchJson(params.get('fixture')), tokenizer) });
  })().catch(fail);
} else if (params.get('model')) {
  state.status = 'running';
  (async () => {
    const modelUrl = new URL(params.get('model'), window.location.href);
    model = await loadModel(await fetchBytes(modelUrl), modelUrl.pathname.split('/').pop());
    if (model.modality === 'text') {
      model.tokenizer = new Tokenizer(await fetchJson(new URL(tokenizerFileName(model.preprocess), modelUrl)), {});
      // Several text= parameters: each one is classified (state.results), the first shown.
      const texts = params.getAll('text');
      state.results = [];
      for (const text of texts.slice(1)) state.results.push(await classifyText(model, text));
      element('text').value = texts[0] ?? '';
      showModel();
      await run();
      if (state.result) state.results.unshift(state.result);
      if (state.status === 'running') state.status = 'loaded';
      return;
    } else if (params.get('image')) {
      const response = await fetch(params.get('image'));
      if (!response.ok) throw new Error(`cannot fetch ${params.get('image')}: HTTP ${response.status}`);
      image = await decodeImage(await response.blob());
    }
    showModel();
    await run();
    if (state.status === 'running') state.status = 'loaded';
  })().catch(fail);
}
