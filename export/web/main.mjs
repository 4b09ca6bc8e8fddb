// Classify an image in the browser with an exported zmdevice student (onnxruntime-web).
//
// Everything the page needs is inside the .onnx file: the class names and preprocessing
// sit in the model's metadata_props (zmdevice.classes, zmdevice.preprocess), which
// onnxruntime-web does not expose, so readMetadata() reads them from the protobuf itself.
//
// Preprocessing is the Python runtime's, step for step: RGB (transparency on white) ->
// PIL-exact bilinear resize to S x S (resizeBilinear) -> /255 -> (x - mean) / std -> CHW.
// The pixels then equal `zmdevice predict`'s wherever the browser decodes the file to the
// same pixels as PIL (PNG, BMP, GIF: yes; JPEG decoders may differ by a level or two).

import * as ort from './node_modules/onnxruntime-web/dist/ort.wasm.min.mjs';

// Only ort-wasm-simd-threaded.{mjs,wasm} are fetched from here. One thread: several
// threads need cross-origin isolation (COOP/COEP headers) that a plain static server lacks.
ort.env.wasm.wasmPaths = new URL('./node_modules/onnxruntime-web/dist/', import.meta.url).href;
ort.env.wasm.numThreads = 1;

/** Read a protobuf varint at `pos`; returns [value, next position]. */
function readVarint(bytes, pos) {
  let value = 0;
  let scale = 1;
  for (;;) {
    const byte = bytes[pos++];
    value += (byte & 0x7f) * scale;
    if (byte < 0x80) return [value, pos];
    scale *= 128;
  }
}

/** Walk one protobuf message, calling visit(field, start, end) per length-delimited field. */
function walkMessage(bytes, start, end, visit) {
  let pos = start;
  while (pos < end) {
    let key;
    [key, pos] = readVarint(bytes, pos);
    const field = Math.floor(key / 8);
    const wireType = key & 7;
    if (wireType === 0) {
      [, pos] = readVarint(bytes, pos);
    } else if (wireType === 1) {
      pos += 8;
    } else if (wireType === 5) {
      pos += 4;
    } else if (wireType === 2) {
      let length;
      [length, pos] = readVarint(bytes, pos);
      visit(field, pos, pos + length);
      pos += length;
    } else {
      throw new Error(`unsupported protobuf wire type ${wireType}`);
    }
  }
}

/** The ONNX ModelProto's metadata_props (field 14) as a plain object. */
export function readMetadata(bytes) {
  const decoder = new TextDecoder();
  const metadata = {};
  walkMessage(bytes, 0, bytes.length, (field, start, end) => {
    if (field !== 14) return;
    let key = '';
    let value = '';
    walkMessage(bytes, start, end, (entryField, s, e) => {
      if (entryField === 1) key = decoder.decode(bytes.subarray(s, e));
      if (entryField === 2) value = decoder.decode(bytes.subarray(s, e));
    });
    metadata[key] = value;
  });
  return metadata;
}

// PIL's bilinear resize (Pillow's Resample.c), reproduced so that the page feeds the model
// the same pixels as `zmdevice predict` for images of any size: a triangle filter widened
// by the downscale factor, weights in 22-bit fixed point, a horizontal pass to 8-bit
// pixels, then a vertical pass.
const PRECISION_BITS = 22;

/** Per output pixel: first input index, count, and fixed-point weights. */
function resizeCoefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = 1 * filterScale; // the bilinear (triangle) filter's support is 1
  const coefficients = [];
  for (let out = 0; out < outSize; out++) {
    const center = (out + 0.5) * scale;
    const first = Math.max(Math.trunc(center - support + 0.5), 0);
    const count = Math.min(Math.trunc(center + support + 0.5), inSize) - first;
    const weights = [];
    let total = 0;
    for (let i = 0; i < count; i++) {
      const w = Math.max(1 - Math.abs((i + first - center + 0.5) / filterScale), 0);
      weights.push(w);
      total += w;
    }
    const fixed = weights.map((w) => {
      const v = (total !== 0 ? w / total : w) * (1 << PRECISION_BITS);
      return Math.trunc(v < 0 ? v - 0.5 : v + 0.5);
    });
    coefficients.push({ first, count, fixed });
  }
  return coefficients;
}

function clip8(sum) {
  if (sum >= 2 ** (PRECISION_BITS + 8)) return 255;
  if (sum <= 0) return 0;
  return Math.floor(sum / 2 ** PRECISION_BITS);
}

/** RGB bytes [h, w, 3] -> [size, size, 3], exactly as PIL's Image.resize(BILINEAR). */
export function resizeBilinear(rgb, width, height, size) {
  if (width === size && height === size) return rgb;
  const horizontal = resizeCoefficients(width, size);
  const vertical = resizeCoefficients(height, size);
  // Pillow resizes only the rows the vertical pass reads.
  const rowFirst = vertical[0].first;
  const rowLast = vertical[size - 1].first + vertical[size - 1].count;
  let source = rgb;
  let sourceWidth = width;
  let rowOffset = 0;
  if (width !== size) {
    const rows = rowLast - rowFirst;
    const temp = new Uint8Array(rows * size * 3);
    for (let y = 0; y < rows; y++) {
      for (let x = 0; x < size; x++) {
        const { first, count, fixed } = horizontal[x];
        for (let c = 0; c < 3; c++) {
          let sum = 1 << (PRECISION_BITS - 1);
          for (let i = 0; i < count; i++) {
            sum += rgb[((y + rowFirst) * width + first + i) * 3 + c] * fixed[i];
          }
          temp[(y * size + x) * 3 + c] = clip8(sum);
        }
      }
    }
    source = temp;
    sourceWidth = size;
    rowOffset = rowFirst;
  }
  if (height === size && rowOffset === 0) return source;
  const out = new Uint8Array(size * size * 3);
  for (let y = 0; y < size; y++) {
    const { first, count, fixed } = vertical[y];
    for (let x = 0; x < size; x++) {
      for (let c = 0; c < 3; c++) {
        let sum = 1 << (PRECISION_BITS - 1);
        for (let i = 0; i < count; i++) {
          sum += source[((first - rowOffset + i) * sourceWidth + x) * 3 + c] * fixed[i];
        }
        out[(y * size + x) * 3 + c] = clip8(sum);
      }
    }
  }
  return out;
}

/** RGB bytes [S, S, 3] -> normalised float32 CHW tensor [1, 3, S, S]. */
export function toTensor(rgb, preprocess) {
  const size = preprocess.image_size;
  const plane = size * size;
  const data = new Float32Array(3 * plane);
  const order = (preprocess.channel_order || 'RGB').toUpperCase() === 'BGR' ? [2, 1, 0] : [0, 1, 2];
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) {
      const value = rgb[3 * i + order[c]] / 255;
      data[c * plane + i] = (value - preprocess.mean[c]) / preprocess.std[c];
    }
  }
  return new ort.Tensor('float32', data, [1, 3, size, size]);
}

function softmax(logits) {
  const max = Math.max(...logits);
  const exp = Array.from(logits, (x) => Math.exp(x - max));
  const sum = exp.reduce((a, b) => a + b, 0);
  return exp.map((x) => x / sum);
}

/** Load a model from its bytes: session plus decoded zmdevice metadata. */
export async function loadModel(bytes) {
  const raw = readMetadata(bytes);
  if (!raw['zmdevice.classes']) throw new Error('this .onnx file has no zmdevice metadata');
  if (raw['zmdevice.modality'] !== 'image') {
    throw new Error('this page classifies images; the model is a text model');
  }
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ['wasm'] });
  return {
    session,
    classes: JSON.parse(raw['zmdevice.classes']),
    preprocess: JSON.parse(raw['zmdevice.preprocess']),
  };
}

/** Classify one decoded image (an ImageBitmap or <img>); shows the model's input on `canvas`. */
export async function classify(model, image, canvas) {
  const size = model.preprocess.image_size;
  // The image at its own size (no browser resampling); transparent pixels land on white,
  // as zmdevice.data.to_rgb composites them in Python.
  const work = document.createElement('canvas');
  work.width = image.width;
  work.height = image.height;
  const context = work.getContext('2d', { willReadFrequently: true });
  context.fillStyle = '#ffffff';
  context.fillRect(0, 0, image.width, image.height);
  context.drawImage(image, 0, 0);
  const rgba = context.getImageData(0, 0, image.width, image.height).data;
  const rgb = new Uint8Array(image.width * image.height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    rgb[j] = rgba[i];
    rgb[j + 1] = rgba[i + 1];
    rgb[j + 2] = rgba[i + 2];
  }
  const resized = resizeBilinear(rgb, image.width, image.height, size);
  showPixels(canvas, resized, size);
  const outputs = await model.session.run({ pixel_values: toTensor(resized, model.preprocess) });
  const probabilities = softmax(outputs.logits.data);
  let best = 0;
  for (let i = 1; i < probabilities.length; i++) if (probabilities[i] > probabilities[best]) best = i;
  const logits = Array.from(outputs.logits.data);
  return { class: model.classes[best], index: best, probabilities, logits, classes: model.classes };
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
  // colorSpaceConversion 'none': pixels as stored, like PIL (no colour-profile transform).
  return createImageBitmap(blob, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
}

// ---- page wiring -------------------------------------------------------------------------
const state = { status: 'idle' };
window.zmdevice = state;
const resultBox = document.getElementById('result');
const canvas = document.getElementById('canvas');
let model = null;
let image = null;

function show(text) {
  resultBox.textContent = text;
}

async function run() {
  if (!model || !image) return;
  state.status = 'running';
  const started = performance.now();
  const result = await classify(model, image, canvas);
  result.milliseconds = performance.now() - started;
  Object.assign(state, { status: 'done', result });
  const ranked = result.probabilities
    .map((p, i) => [p, result.classes[i]])
    .sort((a, b) => b[0] - a[0])
    .slice(0, 5);
  show(ranked.map(([p, name]) => `${name}\t${p.toFixed(3)}`).join('\n'));
}

function fail(error) {
  Object.assign(state, { status: 'error', error: String(error && error.message ? error.message : error) });
  show(`error: ${state.error}`);
}

async function fetchBytes(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`cannot fetch ${url}: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

document.getElementById('model-file').addEventListener('change', async (event) => {
  try {
    model = await loadModel(new Uint8Array(await event.target.files[0].arrayBuffer()));
    show(`model loaded: ${model.classes.length} classes`);
    await run();
  } catch (error) {
    fail(error);
  }
});

document.getElementById('image-file').addEventListener('change', async (event) => {
  try {
    image = await decodeImage(event.target.files[0]);
    await run();
  } catch (error) {
    fail(error);
  }
});

const params = new URLSearchParams(window.location.search);
if (params.get('model') && params.get('image')) {
  state.status = 'running';
  (async () => {
    model = await loadModel(await fetchBytes(params.get('model')));
    const response = await fetch(params.get('image'));
    if (!response.ok) throw new Error(`cannot fetch ${params.get('image')}: HTTP ${response.status}`);
    image = await decodeImage(await response.blob());
    await run();
  })().catch(fail);
}
