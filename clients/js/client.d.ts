// Types for client.js, the JavaScript client of the session-aware inference server.

export type Interpolation = "bilinear" | "bicubic" | "nearest";
export type Color = "rgb" | "grayscale";

/** A session's preprocessing options, as the server returns them. */
export interface Options {
  /** Shorter side after resizing, 32–1024 (default 256). */
  resize: number;
  /** Centre crop, 32–1024 and ≤ resize (default 224). */
  crop: number;
  interpolation: Interpolation;
  color: Color;
  mean: [number, number, number];
  std: [number, number, number];
  /** How many classes to return, 1–20 (default 5). */
  top_k: number;
  /** The session's model (GET /v1/models lists them); absent or null: the server's default model. */
  model?: string | null;
  /** Pins the session to a version of its model (GET /v1/models); absent or null: the active version. */
  model_version?: string | null;
}

/** Changes to options: any subset (PATCH merges them). */
export type OptionChanges = Partial<Options>;

/** Per-request overrides, sent as query parameters (arrays are joined with commas). */
export type PredictOverrides = Partial<Options>;

export interface LoginResult {
  token: string;
  session_id: string;
  /** ISO 8601 time. */
  expires_at: string;
  options: Options;
}

export interface SessionInfo {
  session_id: string;
  created_at: string;
  expires_at: string;
  options: Options;
  /** Number of predictions in the session's history. */
  predictions: number;
}

export interface Score {
  class_index: number;
  label: string;
  /** Probability, 0–1. */
  score: number;
}

export interface ModelInfo {
  name: string;
  version: string;
}

/** A recorded prediction, as the history returns it. */
export interface HistoryItem {
  /** History id, e.g. "1795618038939-0"; newer ids sort after older ones. */
  id: string;
  created_at: string;
  predicted_class: number;
  label: string;
  top_k: Score[];
  options: Options;
  model: ModelInfo;
  /** The captured image (capture on), or null; read it with historyImage(id). */
  image: CapturedImage | null;
  /** The corrected label the session gave (PUT .../feedback), or null. */
  feedback: Feedback | null;
}

export interface CapturedImage {
  sha256: string;
  /** What the bytes are: image/jpeg, image/png, image/webp, image/gif or image/bmp. */
  content_type: string;
  /** Bytes. */
  size: number;
}

/** A user's correction of a prediction. */
export interface Feedback {
  class_index: number;
  label: string;
  comment: string | null;
  created_at: string;
}

/** The answer of predict(): the history item plus timings. */
export interface Prediction extends HistoryItem {
  timing_ms: { queue: number; preprocess: number; inference: number; [stage: string]: number };
}

export interface HistoryPage {
  items: HistoryItem[];
  /** Pass back as `before` for the next page; null on the last page. */
  next: string | null;
}

export type ImageInput = Blob | ArrayBuffer | Uint8Array;

/** The answer of preprocess(): the model's input for one image. */
export interface PreprocessedTensor {
  dtype: "float32";
  byte_order: "little";
  /** [3, crop, crop]: channels, height, width. */
  shape: [number, number, number];
  /** The values in C order (channel, then row, then column). */
  data: Float32Array;
  /** The options it was made under. */
  options: Options;
}

export interface ClientSettings {
  /** A token from an earlier login, to resume a session. */
  token?: string | null;
  /** Milliseconds per attempt before a request is aborted (ConnectionFailed, code "timeout"). Default 30000; 0 = none. */
  timeout?: number;
  /** Extra attempts after a network error, 503 or 429. Default 3. */
  retries?: number;
  /** First back-off delay in ms, doubled each retry (Retry-After wins when sent). Default 250. */
  backoff?: number;
  /** A fetch implementation to use instead of globalThis.fetch. */
  fetch?: typeof globalThis.fetch;
  /** A WebSocket class for predictStream() instead of globalThis.WebSocket. */
  WebSocket?: typeof globalThis.WebSocket;
}

export interface ModelVersion {
  name?: string;
  version: string;
  sha256: string;
  /** Bytes of the state_dict file. */
  size: number;
  uploaded_at: string;
  /** The last activation (ISO 8601), or null. */
  activated_at: string | null;
  active: boolean;
  /** The feedback this version's predictions got. */
  feedback?: FeedbackQuality;
}

/** How much feedback a version got and the share agreeing with its top-1 (null without feedback). */
export interface FeedbackQuality {
  count: number;
  agreement: number | null;
}

/** A version serving a share of the sessions; the others keep `baseline`. */
export interface Canary {
  version: string;
  traffic_percent: number;
  baseline: string;
  started_at: string;
}

/** The preprocessing options a model gives its own defaults for. */
export type Preprocessing = Pick<Options, "resize" | "crop" | "interpolation" | "mean" | "std">;

/** A model's class labels (GET /v1/models/<name>/labels): index i names class i. */
export interface ModelLabels {
  name: string;
  version: string;
  labels: string[];
}

export interface ModelList {
  /** The model a session without the `model` option runs. */
  default?: string;
  models: {
    name: string;
    /** Whether it is the server's default model. */
    default?: boolean;
    format?: "torchvision" | "onnx" | "torchscript";
    architecture?: string;
    /** How many classes it tells apart (its labels' count). */
    classes?: number;
    input?: { layout: "NCHW" | "NHWC"; size: number | null };
    output?: "logits" | "probabilities";
    /** The options a session starts from when it chooses this model. */
    preprocess?: Preprocessing;
    description?: string;
    /** Whether this process holds it in memory now (models are loaded on first use). */
    loaded?: boolean;
    active_version: string | null;
    serving_version: string;
    /** null without a canary. */
    canary?: Canary | null;
    /** The weights named in the server's config. */
    configured?: { version: string; sha256: string; feedback: FeedbackQuality };
    versions: ModelVersion[];
  }[];
}

/** One item for predictStream(): an image, or an image with its own ref and option overrides. */
export type StreamItem = ImageInput | { image: ImageInput; ref?: string | number; options?: PredictOverrides };

/** One image's outcome on predictStream(): `result`, or `error` for that image alone. */
export interface StreamResult {
  ref: string | number | null;
  /** The item's index in the whole stream, from 0 (across resumes after a 1001 close too). */
  seq: number | null;
  result: Prediction | null;
  error: InferenceError | null;
}

export interface ErrorDetails {
  code?: string;
  status?: number;
  requestId?: string | null;
  body?: unknown;
  cause?: unknown;
  retryAfter?: number | null;
  field?: string | null;
}

/** Base of every error the client throws. */
export class InferenceError extends Error {
  constructor(message: string, details?: ErrorDetails);
  /** The server's snake_case code ("session_revoked", "invalid_options", …) or a client one ("timeout", "network_error", "invalid_url"). */
  code: string;
  /** HTTP status; 0 when no answer came. */
  status: number;
  /** The X-Request-ID of the answer, when there was one. */
  requestId: string | null;
  /** The parsed JSON body of the error answer, when there was one. */
  body: unknown;
}
/** 401. */
export class AuthError extends InferenceError {}
/** 400 or 422. */
export class ValidationError extends InferenceError {
  /** For code "invalid_options": the option at fault, when known. */
  field: string | null;
}
/** 404. */
export class NotFoundError extends InferenceError {}
/** 413. */
export class PayloadTooLarge extends InferenceError {}
/** 415. */
export class UnsupportedMediaType extends InferenceError {}
/** 429. */
export class RateLimited extends InferenceError {
  /** Seconds, from the Retry-After header; null when absent. */
  retryAfter: number | null;
}
/** 503 (server_busy, store_unavailable). */
export class ServerBusy extends InferenceError {
  /** Seconds, from the Retry-After header; null when absent. */
  retryAfter: number | null;
}
/** Any other 5xx. */
export class ServerError extends InferenceError {}
/** No HTTP answer: code "network_error" or "timeout". */
export class ConnectionFailed extends InferenceError {}

/** The default model's name in a GET /v1/models answer (its one model where none is named), or null. */
export function defaultModel(listing: ModelList): string | null;

/** The image MIME type named by the first bytes (JPEG, PNG, GIF, WebP, BMP), or null. */
export function sniffImageType(bytes: Uint8Array): string | null;

/** How many times one predictStream() resumes after a 1001 close before the close is the caller's error. */
export const MAX_STREAM_RESUMES: number;

export class Client {
  /** @param baseUrl the server's address, e.g. "http://127.0.0.1:8000"; "" (default) means the page's own origin. */
  constructor(baseUrl?: string, settings?: ClientSettings);
  readonly baseUrl: string;
  timeout: number;
  retries: number;
  backoff: number;
  /** The session token: null before login() and after logout(). Set it to resume a session. */
  token: string | null;

  /** POST /v1/sessions. Keeps the token. `apiKey` is needed where the server sets auth.api_keys; `model` chooses the session's model. */
  login(args?: { apiKey?: string; options?: OptionChanges; model?: string | null }): Promise<LoginResult>;
  /** GET /v1/session. */
  session(): Promise<SessionInfo>;
  /** GET /v1/session/options. */
  options(): Promise<Options>;
  /** PATCH /v1/session/options; resolves to the options after the change (a new `model` starts its preprocessing defaults). */
  setOptions(changes: OptionChanges): Promise<Options>;
  /** DELETE /v1/session; clears the token. `erase: true` also erases the session's history, feedback and captured images. */
  logout(args?: { erase?: boolean }): Promise<void>;

  /** POST /v1/predict with the raw image; `overrides` apply to this request only. */
  predict(image: ImageInput, overrides?: PredictOverrides): Promise<Prediction>;
  /** POST /v1/preprocess: the float32 tensor the model would see (nothing is classified or recorded). */
  preprocess(image: ImageInput, overrides?: PredictOverrides): Promise<PreprocessedTensor>;
  /** predict() for each image, `concurrency` at a time (default 4); results in input order. */
  predictMany(images: Iterable<ImageInput>, settings?: PredictOverrides & { concurrency?: number }): Promise<Prediction[]>;

  /**
   * GET /v1/stream (WebSocket): one StreamResult per image, in completion order. A 1001 close (the server
   * shuts down) resumes on a new connection with the same session, sending only the unanswered images
   * again (at most MAX_STREAM_RESUMES times).
   */
  predictStream(images: Iterable<StreamItem> | AsyncIterable<StreamItem>, overrides?: PredictOverrides): AsyncGenerator<StreamResult, void, undefined>;

  /** GET /v1/models: every served model, the default named, with its versions (session token, or an admin key). */
  models(args?: { adminKey?: string }): Promise<ModelList>;
  /** GET /v1/models/<model>/labels: the class labels, index i naming class i (what `feedback` takes); no model: the session's, else the default. */
  labels(model?: string | null, args?: { adminKey?: string }): Promise<string[]>;
  /** labels() with the model's name and version. */
  modelLabels(model?: string | null, args?: { adminKey?: string }): Promise<ModelLabels>;
  /** PUT a state_dict file as a new version (admin key), with its SHA-256. */
  publishVersion(name: string, version: string, weights: Uint8Array | ArrayBuffer | Blob, args: { adminKey: string }): Promise<ModelVersion>;
  /** Serve `version` to new requests on every replica (admin key); `trafficPercent` (1–100) below 100 makes it a canary for that share of sessions. */
  activateVersion(name: string, version: string, args: { adminKey: string; trafficPercent?: number }): Promise<ModelVersion | (Canary & { name: string })>;
  /** Remove a version that is not active (admin key). */
  removeVersion(name: string, version: string, args: { adminKey: string }): Promise<void>;
  /** Let sessions pin `version` (admin key), or with `pinnable: false` no longer; the active version and the canary's always may be pinned. */
  setPinnable(name: string, version: string, args: { adminKey: string; pinnable?: boolean }): Promise<{ name: string; version: string; pinnable: boolean }>;

  /** GET /v1/history: one page, newest first. */
  historyPage(args?: { limit?: number; before?: string | null }): Promise<HistoryPage>;
  /** Every history item, newest first, fetched `limit` (1–100, server default 20) per page as iteration goes on. */
  history(args?: { limit?: number; before?: string | null }): AsyncGenerator<HistoryItem, void, undefined>;
  /** GET /v1/history/<id>. */
  historyItem(id: string): Promise<HistoryItem>;
  /** PUT /v1/history/<id>/feedback: the right label (class index or label name, any case); resolves to the item with its feedback. */
  feedback(id: string, label: number | string, args?: { comment?: string }): Promise<HistoryItem>;
  /** DELETE /v1/history/<id>/feedback. */
  removeFeedback(id: string): Promise<void>;
  /** GET /v1/history/<id>/image: the captured image as sent (NotFoundError where none was captured). */
  historyImage(id: string): Promise<Blob>;
  /** GET /v1/feedback/export (admin key): the training export's body, a WebDataset tar or JSON lines, as a stream. */
  exportFeedback(args: {
    adminKey: string;
    since?: Date | number | string;
    until?: Date | number | string;
    /** Only the predictions of this model. */
    model?: string;
    modelVersion?: string;
    format?: "tar" | "jsonl";
  }): Promise<ReadableStream<Uint8Array>>;
  /** DELETE /v1/feedback (admin key): the feedback given in a time range and/or of one session (the export's `session` field); how many records went. */
  purgeFeedback(args: {
    adminKey: string;
    since?: Date | number | string;
    until?: Date | number | string;
    session?: string;
  }): Promise<number>;
}

export default Client;
