// Load an exported zmdevice model in Node.js and classify texts or image files with it.
// Shared by classify.mjs (command line) and serve.mjs (HTTP endpoint).
//
// All preprocessing comes from ../web/preprocess.mjs, the module the browser page uses:
// one JavaScript implementation of the contract, tested against the Python runtime.
// Image files are decoded in pure JavaScript: PNG (pngjs: 8-bit grey, grey+alpha, RGB,
// RGBA, palette, with transparency) gives the same pixels as PIL; JPEG (jpeg-js) may
// differ from PIL's libjpeg by a level or two per pixel.

import { readFile } from 'node:fs/promises';
import path from 'node:path';

import { Tokenizer } from '@huggingface/tokenizers';
import jpeg from 'jpeg-js';
import * as ort from 'onnxruntime-node';
import pngjs from 'pngjs';

import {
  imageInput,
  parseModelMetadata,
  readMetadata,
  softmax,
  textInputs,
  tokenizerFileName,
  topK,
} from '../web/preprocess.mjs';

/** Inputs per onnxruntime call, as `zmdevice predict` batches them. */
export const BATCH_SIZE = 32;

/** The session, metadata and (text models) tokenizer of NAME.onnx or NAME.ort. */
export async function loadModel(modelPath, { threads = 1 } = {}) {
  const bytes = new Uint8Array(await readFile(modelPath));
  // metadata_props are read from the ONNX protobuf; an .ort file is a FlatBuffer, so its
  // metadata comes from the session (onnxruntime-node exposes none), hence .onnx here.
  const info = parseModelMetadata(readMetadata(bytes));
  const session = await ort.InferenceSession.create(bytes, {
    executionProviders: ['cpu'],
    intraOpNumThreads: threads,
  });
  let tokenizer = null;
  if (info.modality === 'text') {
    const file = path.join(path.dirname(modelPath), tokenizerFileName(info.preprocess));
    let json;
    try {
      json = JSON.parse(await readFile(file, 'utf8'));
    } catch (error) {
      throw new Error(`${modelPath} needs its tokenizer file ${file}: ${error.message}`);
    }
    tokenizer = new Tokenizer(json, {});
  }
  return { name: path.basename(modelPath), session, tokenizer, ...info };
}

/** Decode PNG or JPEG bytes to interleaved 8-bit pixels. */
export function decodeImage(bytes) {
  const buffer = Buffer.from(bytes);
  if (buffer.subarray(0, 8).equals(Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]))) {
    // RGBA always (grey and palette expanded, tRNS transparency applied)
    const png = pngjs.PNG.sync.read(buffer);
    if (png.depth !== 8 && png.depth !== 1 && png.depth !== 2 && png.depth !== 4) {
      throw new Error(`${png.depth}-bit PNG: convert it to 8-bit first`);
    }
    return { pixels: png.data, width: png.width, height: png.height, channels: 4 };
  }
  if (buffer[0] === 0xff && buffer[1] === 0xd8) {
    const image = jpeg.decode(buffer, { formatAsRGBA: false, useTArray: true });
    return { pixels: image.data, width: image.width, height: image.height, channels: 3 };
  }
  throw new Error('unsupported image format: PNG and JPEG only');
}

/** Logits [rows][classes] of one onnxruntime call. */
async function runLogits(model, feeds) {
  const { logits } = await model.session.run(feeds);
  const [rows, classes] = logits.dims;
  return Array.from({ length: rows }, (_, r) => Array.from(logits.data.subarray(r * classes, (r + 1) * classes)));
}

/** Logits of a batch of texts (text model). */
export async function textLogits(model, texts) {
  const batch = textInputs(model.tokenizer, texts, model.preprocess);
  return runLogits(model, {
    input_ids: new ort.Tensor('int64', batch.ids, batch.dims),
    attention_mask: new ort.Tensor('int64', batch.mask, batch.dims),
  });
}

/** Logits of a batch of decoded images (image model). */
export async function imageLogits(model, images) {
  const size = model.preprocess.image_size;
  const plane = 3 * size * size;
  const data = new Float32Array(images.length * plane);
  images.forEach((image, i) => {
    const input = imageInput(image.pixels, image.width, image.height, image.channels, model.preprocess);
    data.set(input.data, i * plane);
  });
  return runLogits(model, { pixel_values: new ort.Tensor('float32', data, [images.length, 3, size, size]) });
}

/**
 * Classify inputs: text strings for a text model, decoded images for an image model.
 * Returns one {top, probabilities, logits} per input, batched as `zmdevice predict` does.
 */
export async function classify(model, inputs, { topK: k = 1 } = {}) {
  const results = [];
  for (let start = 0; start < inputs.length; start += BATCH_SIZE) {
    const batch = inputs.slice(start, start + BATCH_SIZE);
    const rows = model.modality === 'text' ? await textLogits(model, batch) : await imageLogits(model, batch);
    for (const logits of rows) {
      const probabilities = softmax(logits);
      results.push({ top: topK(probabilities, model.classes, k), probabilities, logits });
    }
  }
  return results;
}
