// The preprocessing contract of an exported zmdevice model, in JavaScript: ONE module,
// imported by the browser page (web/main.mjs) and by the Node.js sample (node/model.mjs).
//
// It has no dependency: no onnxruntime, no DOM, no tokenizer library import (callers pass
// a @huggingface/tokenizers Tokenizer in). Each function reproduces zmdevice's Python
// runtime (zmdevice/runtime.py) step for step, and tests/fixtures/preprocess.json holds
// inputs with the Python outputs that both the browser and Node are tested against.
//
// Image: pixels (grey, grey+alpha, RGB or RGBA bytes) -> RGB, transparency composited on
// white exactly as PIL's Image.alpha_composite -> PIL-exact bilinear resize to S x S ->
// /255 -> (x - mean) / std -> float32 CHW.
// Text: the tokenizer file's own normaliser (lowercasing, accents) and [CLS]/[SEP] ->
// truncated to max_length tokens (specials kept) -> right-padded with pad_token_id, mask 0.

/** Read a protobuf varint at `pos`; returns [value, next position]. */
function readVarint(bytes, pos) {
  let value = 0;
  let scale = 1;
  for (;;) {
    // past the end, bytes[pos] is undefined and the loop would never end
    if (pos >= bytes.length) throw new Error('truncated protobuf varint');
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
      if (pos + length > end) throw new Error(`protobuf field ${field} runs past its message`);
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

/** The zmdevice metadata of a model: classes, modality and preprocess settings. */
export function parseModelMetadata(raw) {
  if (!raw['zmdevice.classes'] || !raw['zmdevice.preprocess']) {
    throw new Error('this .onnx file has no zmdevice metadata: export it with `zmdevice export`');
  }
  const modality = raw['zmdevice.modality'];
  if (modality !== 'image' && modality !== 'text') {
    throw new Error(`unknown zmdevice.modality '${modality}': re-export the model`);
  }
  return {
    classes: JSON.parse(raw['zmdevice.classes']),
    modality,
    preprocess: JSON.parse(raw['zmdevice.preprocess']),
    student: raw['zmdevice.student'] || '',
    quantization: raw['zmdevice.quantization'] || null,
  };
}

/** The tokenizer file name of a text model; a bare name, so it stays beside the model. */
export function tokenizerFileName(preprocess) {
  const name = preprocess.tokenizer || 'tokenizer.json';
  if (name.includes('/') || name.includes('\\') || name.startsWith('.')) {
    throw new Error(`tokenizer name '${name}' in the metadata is not a plain file name`);
  }
  return name;
}

// PIL's Image.alpha_composite (AlphaComposite.c) of one pixel over opaque white, in the
// same integer arithmetic, so semi-transparent pixels match Python's to the level.
const COMPOSITE_BITS = 7;

function shiftForDiv255(a) {
  return ((a >>> 8) + a) >>> 8;
}

function overWhite(value, alpha) {
  if (alpha === 0) return 255;
  const outAlpha255 = alpha * 255 + 255 * (255 - alpha);
  const coef1 = Math.floor((alpha * 255 * 255 * (1 << COMPOSITE_BITS)) / outAlpha255);
  const coef2 = 255 * (1 << COMPOSITE_BITS) - coef1;
  const total = value * coef1 + 255 * coef2 + (0x80 << COMPOSITE_BITS);
  return shiftForDiv255(total) >>> COMPOSITE_BITS;
}

/**
 * Interleaved 8-bit pixels with `channels` per pixel (1 grey, 2 grey+alpha, 3 RGB,
 * 4 RGBA) -> RGB bytes [height, width, 3], transparent pixels on white (zmdevice.images.to_rgb).
 */
export function toRgb(pixels, width, height, channels) {
  const count = width * height;
  if (pixels.length !== count * channels) {
    throw new Error(`expected ${count * channels} bytes for ${width}x${height}x${channels}`);
  }
  const rgb = new Uint8Array(count * 3);
  for (let i = 0; i < count; i++) {
    const at = i * channels;
    const colour = channels >= 3 ? [pixels[at], pixels[at + 1], pixels[at + 2]] : [pixels[at], pixels[at], pixels[at]];
    const alpha = channels === 2 ? pixels[at + 1] : channels === 4 ? pixels[at + 3] : 255;
    for (let c = 0; c < 3; c++) rgb[i * 3 + c] = alpha === 255 ? colour[c] : overWhite(colour[c], alpha);
  }
  return rgb;
}

/** RGB bytes [S, S, 3] -> normalised float32 CHW data (length 3 * S * S). */
export function normalise(rgb, preprocess) {
  const size = preprocess.image_size;
  const plane = size * size;
  const data = new Float32Array(3 * plane);
  const order = (preprocess.channel_order || 'RGB').toUpperCase() === 'BGR' ? [2, 1, 0] : [0, 1, 2];
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) {
      // float32 at each step, as numpy computes the Python reference in float32
      const value = Math.fround(rgb[3 * i + order[c]] / 255);
      const centred = Math.fround(value - Math.fround(preprocess.mean[c]));
      data[c * plane + i] = centred / Math.fround(preprocess.std[c]);
    }
  }
  return data;
}

/** Decoded pixels of any size and channel count -> pixel_values data [3, S, S] (+ the S x S RGB). */
export function imageInput(pixels, width, height, channels, preprocess) {
  const size = preprocess.image_size;
  const resized = resizeBilinear(toRgb(pixels, width, height, channels), width, height, size);
  return { data: normalise(resized, preprocess), dims: [1, 3, size, size], rgb: resized };
}

/**
 * Token ids of one text, as zmdevice's Python runtime makes them: the tokenizer file's
 * normaliser and [CLS]/[SEP], and right truncation of the text's own tokens so that the
 * whole sequence holds at most max_length ids (the Rust tokenizer's enable_truncation).
 */
export function encodeText(tokenizer, text, preprocess) {
  const maxLength = preprocess.max_length;
  const full = tokenizer.encode(text).ids;
  if (full.length <= maxLength) return full;
  // Special tokens around the text: find where the plain ids sit inside the full ids.
  const plain = tokenizer.encode(text, { add_special_tokens: false }).ids;
  const added = full.length - plain.length;
  let prefix = 0;
  while (prefix <= added && !plain.every((id, i) => full[prefix + i] === id)) prefix++;
  if (prefix > added || maxLength < added) {
    throw new Error(`cannot truncate to ${maxLength} tokens around this tokenizer's special tokens`);
  }
  return [
    ...full.slice(0, prefix),
    ...plain.slice(0, maxLength - added),
    ...full.slice(prefix + plain.length),
  ];
}

/** A batch of texts -> input_ids and attention_mask (BigInt64Array [B, L], right-padded). */
export function textInputs(tokenizer, texts, preprocess) {
  return padRows(texts.map((text) => encodeText(tokenizer, text, preprocess)), preprocess);
}

/** Token id rows (encodeText's) -> input_ids and attention_mask, as textInputs. */
export function padRows(rows, preprocess) {
  const length = Math.max(1, ...rows.map((row) => row.length));
  const ids = new BigInt64Array(rows.length * length).fill(BigInt(preprocess.pad_token_id ?? 0));
  const mask = new BigInt64Array(rows.length * length);
  rows.forEach((row, b) => {
    row.forEach((id, i) => {
      ids[b * length + i] = BigInt(id);
      mask[b * length + i] = 1n;
    });
  });
  return { ids, mask, dims: [rows.length, length], rows };
}

/** Softmax of one row of logits, computed in float64. */
export function softmax(logits) {
  const max = Math.max(...logits);
  const exp = Array.from(logits, (x) => Math.exp(x - max));
  const sum = exp.reduce((a, b) => a + b, 0);
  return exp.map((x) => x / sum);
}

/** The k most probable classes, best first: [{class, probability}]. */
export function topK(probabilities, classes, k) {
  return probabilities
    .map((probability, index) => ({ class: classes[index], probability, index }))
    .sort((a, b) => b.probability - a.probability || a.index - b.index)
    .slice(0, k)
    .map(({ class: name, probability }) => ({ class: name, probability }));
}

/** Base64 -> bytes, in the browser and in Node. */
function fromBase64(text) {
  const binary = atob(text);
  return Uint8Array.from(binary, (ch) => ch.charCodeAt(0));
}

/**
 * Run this module on the shared fixture (tests/fixtures/preprocess.json): the tensors and
 * token ids that the tests compare with the Python runtime's.
 */
export function runFixture(fixture, tokenizer) {
  const images = fixture.images.map((image) => {
    const pixels = fromBase64(image.pixels);
    const { data } = imageInput(pixels, image.width, image.height, image.channels, fixture.image_preprocess);
    return { name: image.name, pixel_values: Array.from(data) };
  });
  const batch = textInputs(tokenizer, fixture.texts.map((t) => t.text), fixture.text_preprocess);
  const texts = fixture.texts.map((t, i) => ({ name: t.name, ids: batch.rows[i] }));
  return {
    images,
    texts,
    batch: { input_ids: Array.from(batch.ids, Number), attention_mask: Array.from(batch.mask, Number), dims: batch.dims },
  };
}
