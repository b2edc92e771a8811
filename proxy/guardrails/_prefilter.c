/* The guardrails' prefilter: whether a text could hold a candidate of any built-in shape.

   One pass over the text's UTF-8 bytes that stops only at the few bytes a candidate needs
   (digits, `@`, `:`, `-`, `_` and the letters that end a key prefix) and looks around each
   for what that shape cannot do without: nine digits in a run of digits and separators (seven
   after a `+`), four digit groups joined by dots, two letters and two digits followed by eight
   letters or digits, `:` then at most four hex digits then `:` and a hex digit, a word
   character on both sides of `@`, a key prefix with the characters its shape requires. It
   answers 0 only where the RE2 pattern of `detectors.py` has no candidate at all (the test
   suite checks this on generated texts); 1 means "maybe", and the full detector runs.

   That is the byte-by-byte reading (`scalar_from`). Where the CPU has AVX2, `avx2_scan` reads
   64 bytes at a time and judges the digit shapes on bit masks instead of stopping at digits;
   the two must agree (`vectors()` switches, for the tests).

   Written by hand because no library scans at the speed of the parse: RE2's DFA reads about
   2 ns a byte on prose, Hyperscan 0.6-2 ns with these shapes, orjson parses at 0.4; the
   vectors read prose that carries no candidate (the usual case) at about 0.3. No allocation
   (str's UTF-8 form is the one CPython caches); the only state is which reading is used.
*/

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* category bits, as prefilter.py numbers them */
enum { EMAIL = 1, PHONE = 2, CARD = 4, IBAN = 8, SSN = 16, IP = 32, SECRET = 64 };
#define NUMBER (PHONE | CARD | SSN)

/* byte classes */
enum {
    DIGIT = 1,     /* 0-9 */
    SEP = 2,       /* what a number's shape allows between digits: space . - ( ) */
    HEX = 4,       /* 0-9 A-F a-f */
    ALNUM = 8,     /* 0-9 A-Z a-z */
    TOKEN = 16,    /* 0-9 A-Z a-z _ - */
    BEARER = 32,   /* a bearer token's characters: 0-9 A-Z a-z - . _ ~ + / */
    STOP = 64,     /* where the scan stops to look */
    ALPHA = 128,   /* A-Z a-z */
};

static unsigned char cls[256];

static void init_classes(void) {
    for (int c = '0'; c <= '9'; c++) cls[c] |= DIGIT | HEX | ALNUM | TOKEN | BEARER | STOP;
    for (int c = 'A'; c <= 'Z'; c++) cls[c] |= ALPHA | ALNUM | TOKEN | BEARER;
    for (int c = 'a'; c <= 'z'; c++) cls[c] |= ALPHA | ALNUM | TOKEN | BEARER;
    for (int c = 'A'; c <= 'F'; c++) cls[c] |= HEX;
    for (int c = 'a'; c <= 'f'; c++) cls[c] |= HEX;
    const char *seps = " .-()";
    for (const char *p = seps; *p; p++) cls[(unsigned char)*p] |= SEP;
    cls['_'] |= TOKEN | BEARER;
    cls['-'] |= TOKEN | BEARER;
    const char *bearer = ".~+/";
    for (const char *p = bearer; *p; p++) cls[(unsigned char)*p] |= BEARER;
    /* `@` (email), `:` (IPv6), `-` (-----BEGIN, sk-, xox?-), `_` (gh?_, github_pat_), and the
       last letter of eyJ, AIza (z), the AWS prefixes (A), and the first of [Bb]earer */
    const char *stops = "@:-_JzAbB";
    for (const char *p = stops; *p; p++) cls[(unsigned char)*p] |= STOP;
}

/* at least `count` bytes of class `want` from `at` */
static inline int run_of(const unsigned char *s, Py_ssize_t n, Py_ssize_t at, int want, Py_ssize_t count) {
    if (at < 0 || n - at < count) return 0;
    for (Py_ssize_t k = at; k < at + count; k++)
        if (!(cls[s[k]] & want)) return 0;
    return 1;
}

static inline int has(const unsigned char *s, Py_ssize_t n, Py_ssize_t at, const char *literal) {
    size_t size = strlen(literal);
    return at >= 0 && (size_t)(n - at) >= size && memcmp(s + at, literal, size) == 0;
}

static int in(unsigned char c, const char *set) { return c && strchr(set, c) != NULL; }

/* `[\p{L}\p{N}._%+-]@[\p{L}\p{N}-]` around the `@` at `i`; non-ASCII bytes may be letters */
static int email_at(const unsigned char *s, Py_ssize_t n, Py_ssize_t i) {
    if (i == 0 || i + 1 >= n) return 0;
    unsigned char before = s[i - 1], after = s[i + 1];
    int left = before >= 0x80 || (cls[before] & ALNUM) || in(before, "._%+-");
    int right = after >= 0x80 || (cls[after] & ALNUM) || after == '-';
    return left && right;
}

/* `:` [hex]{0,4} `:` [hex] from the `:` at `i`: every IPv6 shape holds one */
static int colon_at(const unsigned char *s, Py_ssize_t n, Py_ssize_t i) {
    Py_ssize_t k = i + 1;
    while (k < n && k - i <= 4 && (cls[s[k]] & HEX)) k++;
    return k + 1 < n && s[k] == ':' && (cls[s[k + 1]] & HEX);
}

/* The verdict on a run of digits and separators that starts with the digit at `i` and holds
   `digits` digits and `dots` dots. */
static int run_verdict(const unsigned char *s, Py_ssize_t n, Py_ssize_t i, Py_ssize_t digits, Py_ssize_t dots,
                       int mask) {
    if ((mask & NUMBER) && (digits >= 9 || (digits >= 7 && i > 0 && s[i - 1] == '+'))) return 1;
    if ((mask & IP) && dots >= 3 && digits >= 4) return 1;
    if ((mask & IBAN) && i >= 2 && (cls[s[i - 2]] & ALPHA) && (cls[s[i - 1]] & ALPHA) && i + 1 < n &&
        (cls[s[i + 1]] & DIGIT)) {
        /* [A-Za-z]{2}\d{2}, then eight letters or digits, a space at most between two */
        Py_ssize_t count = 0, space = 0;
        for (Py_ssize_t k = i + 2; k < n && count < 8; k++) {
            if (cls[s[k]] & ALNUM) {
                count++;
                space = 0;
            } else if (s[k] == ' ' && !space) {
                space = 1;
            } else {
                break;
            }
        }
        if (count >= 8) return 1;
    }
    return 0;
}

/* The run of digits and separators from the digit at `i`; sets `*end` past its last digit (the
   separators after it are read again: `-----BEGIN` may start there). */
static int digits_at(const unsigned char *s, Py_ssize_t n, Py_ssize_t i, int mask, Py_ssize_t *end) {
    Py_ssize_t digits = 0, dots = 0, k = i, last = i;
    for (; k < n; k++) {
        unsigned char c = cls[s[k]];
        if (c & DIGIT) {
            digits++;
            last = k;
        } else if (c & SEP) {
            dots += s[k] == '.';
        } else {
            break;
        }
    }
    *end = last + 1;
    return run_verdict(s, n, i, digits, dots, mask);
}

static const char *const AWS[] = {"AKI", "ASI", "ABI", "ACC", "AGP", "AID", "ARO", "ANP", "ANV", "APK"};

/* A key's shape at the stop byte `i` (see `_SHAPES` "pem", "token", "bearer", "jwt"). */
static int secret_at(const unsigned char *s, Py_ssize_t n, Py_ssize_t i) {
    switch (s[i]) {
    case '-':
        if (has(s, n, i, "-----BEGIN") || has(s, n, i - 4, "-----BEGIN")) return 1;
        if (has(s, n, i - 2, "sk") && run_of(s, n, i + 1, TOKEN, 20)) return 1;
        if (has(s, n, i - 4, "xox") && in(s[i - 1], "abprs") && run_of(s, n, i + 1, TOKEN, 10)) return 1;
        return 0;
    case '_':
        if (has(s, n, i - 3, "gh") && in(s[i - 1], "pousr") && run_of(s, n, i + 1, ALNUM, 36)) return 1;
        return has(s, n, i - 6, "github_pat_");
    case 'J': {
        if (!has(s, n, i - 2, "ey")) return 0;
        Py_ssize_t k = i + 1;
        while (k < n && (cls[s[k]] & TOKEN)) k++;
        return k - i - 1 >= 8 && k < n && s[k] == '.' && run_of(s, n, k + 1, TOKEN, 8);
    }
    case 'z':
        return has(s, n, i - 2, "AI") && has(s, n, i + 1, "a") && run_of(s, n, i + 2, TOKEN, 35);
    case 'A':
        if (i < 3 || s[i - 3] != 'A' || !in(s[i - 2], "KSBCGIRNP")) return 0;
        for (size_t a = 0; a < sizeof AWS / sizeof AWS[0]; a++)
            if (memcmp(s + i - 3, AWS[a], 3) == 0) return run_of(s, n, i + 1, ALNUM, 16);
        return 0;
    default: { /* b, B */
        if (!has(s, n, i + 1, "earer")) return 0;
        Py_ssize_t k = i + 6, blank = k;
        while (k < n && (s[k] == ' ' || s[k] == '\t')) k++;
        return k > blank && run_of(s, n, k, BEARER, 16);
    }
    }
}

/* The stop bytes' handling, shared by both loops: 1 for a candidate, else sets `*next`. */
static inline int stop_at(const unsigned char *s, Py_ssize_t n, Py_ssize_t i, int mask, Py_ssize_t *next) {
    unsigned char c = s[i];
    *next = i + 1;
    if (cls[c] & DIGIT) return digits_at(s, n, i, mask, next);
    if (c == '@') return (mask & EMAIL) && email_at(s, n, i);
    if (c == ':') return (mask & IP) && colon_at(s, n, i);
    return (mask & SECRET) && secret_at(s, n, i);
}

static int scalar_from(const unsigned char *s, Py_ssize_t n, Py_ssize_t i, int mask) {
    while (i < n) {
        if (!(cls[s[i]] & STOP)) {
            i++;
            continue;
        }
        if (stop_at(s, n, i, mask, &i)) return 1;
    }
    return 0;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

typedef struct {
    uint64_t stops, digits, seps, dots, plus, dash, big_a, r;
} Masks;

/* 32 bytes' classes as bit masks, by their two nibbles (one table lookup each, `vpshufb`): a
   byte's class is LOW[its low nibble] & HIGH[its high nibble]. */
__attribute__((target("avx2"))) static inline void classify32(const unsigned char *at, Masks *m, int shift) {
    /* bit 0 digits 0x30-0x39, 1 `:` 0x3A, 2 `J` `z` (0x4A 0x7A), 3 `@` 0x40, 5 `_` 0x5F, 6 `-`
       0x2D, 7 the separators ` ( ) - .` (0x20 0x28 0x29 0x2D 0x2E); a byte of 0x80 and above has
       no high-nibble bits. `-`, `A` and the `r` of `earer` stop only after what their shapes need. */
    const __m256i low = _mm256_setr_epi8(
        (char)0x89, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, (char)0x81, (char)0x81, 0x06, 0x00, 0x00,
        (char)0xC0, (char)0x80, 0x20, (char)0x89, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, (char)0x81,
        (char)0x81, 0x06, 0x00, 0x00, (char)0xC0, (char)0x80, 0x20);
    const __m256i high = _mm256_setr_epi8(0x00, 0x00, (char)0xC0, 0x03, 0x0C, 0x20, 0x00, 0x04, 0, 0, 0, 0, 0, 0,
                                          0, 0, 0x00, 0x00, (char)0xC0, 0x03, 0x0C, 0x20, 0x00, 0x04, 0, 0, 0, 0,
                                          0, 0, 0, 0);
    __m256i bytes = _mm256_loadu_si256((const __m256i *)at);
    __m256i nibble = _mm256_set1_epi8(0x0F);
    __m256i lo = _mm256_and_si256(bytes, nibble);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
    __m256i both = _mm256_and_si256(_mm256_shuffle_epi8(low, lo), _mm256_shuffle_epi8(high, hi));
    uint32_t none = (uint32_t)_mm256_movemask_epi8(
        _mm256_cmpeq_epi8(_mm256_and_si256(both, _mm256_set1_epi8(0x2E)), _mm256_setzero_si256()));
    m->stops |= (uint64_t)(~none) << shift;
    m->digits |= (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(both, 7)) << shift;
    m->seps |= (uint64_t)(uint32_t)_mm256_movemask_epi8(both) << shift;
    m->dots |= (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi8('.'))) << shift;
    m->plus |= (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi8('+'))) << shift;
    m->dash |= (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(both, 1)) << shift;
    m->big_a |= (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi8('A'))) << shift;
    m->r |= (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi8('r'))) << shift;
}

/* Bit k of a block's mask is its byte k; `BACK` looks n bytes back, into the block before. */
#define BACK(mask, prev, n) ((mask) << (n) | (prev) >> (64 - (n)))

/* The digits among `x` that have `steps` more digits after them in their run of `digits` and
   `seps`, all at once: each step moves from a digit to the next byte, and through separators
   by one addition (its carry runs through a run of separators to the byte after it). */
static inline uint64_t chain(uint64_t x, uint64_t digits, uint64_t seps, int steps) {
    for (int k = 0; k < steps && x; k++) {
        uint64_t next = x << 1;
        uint64_t landed = (next & ~seps) | ((seps + (next & seps)) & ~seps);
        x = landed & digits;
    }
    return x;
}

/* 64 bytes at a time: their classes as bit masks; the digits' shapes judged on the masks
   (runs that reach the block's end byte by byte), the other stops one by one. */
__attribute__((target("avx2"))) static int avx2_scan(const unsigned char *s, Py_ssize_t n, int mask) {
    Py_ssize_t i = 0, skip = 0;  /* digits before `skip` were judged with their run */
    uint64_t prev_digits = 0, prev_dots = 0, prev_plus = 0, prev_members = 0, prev_quad = 0, prev_two = 0;
    uint64_t prev_dash = 0, prev_a = 0, prev_r = 0;
    for (; n - i >= 64; i += 64) {
        Masks m = {0, 0, 0, 0, 0, 0, 0, 0};
        classify32(s + i, &m, 0);
        classify32(s + i + 32, &m, 32);
        uint64_t digits = m.digits, members = digits | m.seps;
        if (digits | prev_digits) {
            /* IPv4: a digit after a dot after a digit, three times, each within four bytes */
            uint64_t quad = digits & BACK(m.dots, prev_dots, 1) & BACK(digits, prev_digits, 2);
            uint64_t two = 0, three = 0;
            if (quad | prev_quad) {
                two = quad & (BACK(quad, prev_quad, 2) | BACK(quad, prev_quad, 3) | BACK(quad, prev_quad, 4));
                three = quad & (BACK(two, prev_two, 2) | BACK(two, prev_two, 3) | BACK(two, prev_two, 4));
            }
            if ((mask & IP) && three) return 1;
            /* IBAN: two digits after two bytes that are neither digits nor separators */
            uint64_t iban = digits & BACK(digits, prev_digits, 1) & ~BACK(members, prev_members, 2) &
                            ~BACK(members, prev_members, 3);
            uint64_t plus_seeds = digits & BACK(m.plus, prev_plus, 1);
            prev_quad = quad, prev_two = two;
            if (skip > i) digits &= skip - i >= 64 ? 0 : ~(uint64_t)0 << (skip - i);
            /* a run reaching the block's end is read byte by byte, from its first digit */
            if (members >> 63) {
                uint64_t breaks = ~members;
                int start = breaks ? 64 - __builtin_clzll(breaks) : 0;
                uint64_t tail = digits & (~(uint64_t)0 << start);
                if (tail) {
                    Py_ssize_t end;
                    if (digits_at(s, n, i + __builtin_ctzll(tail), mask, &end)) return 1;
                    skip = end;
                    digits &= ~tail;
                }
            }
            /* a run inside the block has all its digits in it: nine take nine (seven after `+`) */
            int count = __builtin_popcountll(digits);
            if ((mask & NUMBER) && count >= 7 &&
                ((count >= 9 && chain(digits, digits, m.seps, 8)) || chain(plus_seeds & digits, digits, m.seps, 6)))
                return 1;
            if (mask & IBAN) {
                for (; iban; iban &= iban - 1) {
                    Py_ssize_t at = i + __builtin_ctzll(iban) - 1;
                    if (at >= 2 && run_verdict(s, n, at, 0, 0, IBAN)) return 1;
                }
            }
        } else {
            prev_quad = prev_two = 0;
        }
        uint64_t stops = m.stops;
        if (mask & SECRET) {
            /* `-` after a letter or a `-` (sk-, xox?-, -----), `A` three after an `A` (AKIA...),
               the last `r` of `earer` (two after an `r`) */
            stops |= m.dash & (~BACK(members, prev_members, 1) | BACK(m.dash, prev_dash, 1));
            stops |= m.big_a & BACK(m.big_a, prev_a, 3);
            stops |= m.r & BACK(m.r, prev_r, 2);
        }
        prev_digits = m.digits, prev_dots = m.dots, prev_plus = m.plus, prev_members = members;
        prev_dash = m.dash, prev_a = m.big_a, prev_r = m.r;
        for (; stops; stops &= stops - 1) {
            Py_ssize_t at = i + __builtin_ctzll(stops), next;
            if (s[at] == 'r') {
                if (at >= 5 && (s[at - 5] == 'b' || s[at - 5] == 'B') && secret_at(s, n, at - 5)) return 1;
            } else if (stop_at(s, n, at, mask, &next)) {
                return 1;
            }
        }
    }
    return scalar_from(s, n, i > skip ? i : skip, mask);
}

static int use_avx2;
#endif

static int could_match(const unsigned char *s, Py_ssize_t n, int mask) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (use_avx2) return avx2_scan(s, n, mask);
#endif
    return scalar_from(s, n, 0, mask);
}

/* A text this long is read without the GIL (its owner, the body, is held by the caller), so
   that the event loop runs on while a worker thread reads a large body. */
#define FREE_GIL_BYTES (64 * 1024)

static int scan_text(const unsigned char *data, Py_ssize_t size, int mask) {
    int found;
    if (size < FREE_GIL_BYTES) return could_match(data, size, mask);
    Py_BEGIN_ALLOW_THREADS
    found = could_match(data, size, mask);
    Py_END_ALLOW_THREADS
    return found;
}

/* Texts nested deeper than this are left to the full detector (a maybe). */
#define MAX_DEPTH 64

/* 1 when a str (or bytes) inside `value` (a parsed JSON value: dict values, list items) could
   hold a candidate; dict keys are not texts. */
static int walk(PyObject *value, int mask, int depth) {
    if (PyUnicode_Check(value)) {
        Py_ssize_t size;
        const char *data = PyUnicode_AsUTF8AndSize(value, &size);
        if (data == NULL) {
            PyErr_Clear(); /* a lone surrogate has no UTF-8 form: the full detector judges it */
            return 1;
        }
        return scan_text((const unsigned char *)data, size, mask);
    }
    if (PyBytes_Check(value))
        return scan_text((const unsigned char *)PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value), mask);
    if (PyList_Check(value) || PyTuple_Check(value)) {
        if (depth >= MAX_DEPTH) return 1;
        Py_ssize_t size = PySequence_Fast_GET_SIZE(value);
        PyObject **items = PySequence_Fast_ITEMS(value);
        for (Py_ssize_t k = 0; k < size; k++)
            if (walk(items[k], mask, depth + 1)) return 1;
        return 0;
    }
    if (PyDict_Check(value)) {
        if (depth >= MAX_DEPTH) return 1;
        Py_ssize_t position = 0;
        PyObject *key, *item;
        while (PyDict_Next(value, &position, &key, &item))
            if (walk(item, mask, depth + 1)) return 1;
        return 0;
    }
    return 0; /* numbers, booleans, null */
}

PyDoc_STRVAR(maybe_doc,
"maybe(body, roots, mask) -> bool\n\n"
"Whether a text under `body[root]` for the `roots` (a tuple of keys) of a parsed JSON body\n"
"(the str among dict values and list items, at any depth; a root absent is nothing) could\n"
"hold a candidate of the categories in `mask` (bits: email 1, phone 2, credit_card 4,\n"
"iban 8, ssn 16, ip_address 32, secret 64). False only where the detectors' pattern finds\n"
"no candidate in any of them.");

static PyObject *maybe(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyDict_Check(args[0]) || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "maybe() takes a dict, a tuple of keys and a mask");
        return NULL;
    }
    long mask = PyLong_AsLong(args[2]);
    if (mask == -1 && PyErr_Occurred()) return NULL;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(args[1]); k++) {
        PyObject *root = PyDict_GetItemWithError(args[0], PyTuple_GET_ITEM(args[1], k));
        if (root == NULL && PyErr_Occurred()) return NULL;
        if (root != NULL && walk(root, (int)mask, 0)) Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

PyDoc_STRVAR(vectors_doc,
"vectors(on) -> bool\n\n"
"Whether texts of 64 bytes and more are read 64 at a time with AVX2 (where the CPU has it), or\n"
"byte by byte when `on` is false (the two must agree: the tests compare them). Returns whether\n"
"they were before.");

static PyObject *vectors(PyObject *self, PyObject *on) {
#if defined(__x86_64__) && defined(__GNUC__)
    int before = use_avx2;
    int want = PyObject_IsTrue(on);
    if (want < 0) return NULL;
    __builtin_cpu_init();
    use_avx2 = want && __builtin_cpu_supports("avx2");
    return PyBool_FromLong(before);
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"maybe", (PyCFunction)(void (*)(void))maybe, METH_FASTCALL, maybe_doc},
    {"vectors", vectors, METH_O, vectors_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_prefilter", "The guardrails' prefilter (see prefilter.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__prefilter(void) {
    init_classes();
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2");
#endif
    return PyModule_Create(&module);
}
