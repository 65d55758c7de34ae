package envelope

import (
	"bytes"
	"encoding/json"
	"math"
	"strconv"
	"unicode/utf8"
)

// rawFields holds the raw JSON values of the envelope's fields, as found in
// the top-level object; nil means absent.
type rawFields struct {
	id, version, typ, action, sender, target, deviceID, timestamp, payload, replyTo, err []byte
}

// scanObject walks the members of a top-level JSON object in b, which must
// already be valid JSON, and records the envelope's fields. Keys match
// exactly (JSON.parse semantics, unlike encoding/json's case-insensitive
// matching); a repeated key keeps its last value, as JSON.parse does. It
// reports false if b is not an object. It never panics, even on invalid input.
func scanObject(b []byte, f *rawFields) bool {
	i := skipWS(b, 0)
	if i >= len(b) || b[i] != '{' {
		return false
	}
	i = skipWS(b, i+1)
	if i < len(b) && b[i] == '}' {
		return true
	}
	for i < len(b) {
		if b[i] != '"' {
			return false
		}
		kEnd := skipString(b, i)
		if kEnd < 0 {
			return false
		}
		key := b[i+1 : kEnd-1]
		if bytes.IndexByte(key, '\\') >= 0 {
			// An escaped key ("\u0069d") means the same as the plain one.
			var s string
			if json.Unmarshal(b[i:kEnd], &s) != nil {
				return false
			}
			key = []byte(s)
		}
		i = skipWS(b, kEnd)
		if i >= len(b) || b[i] != ':' {
			return false
		}
		i = skipWS(b, i+1)
		vEnd := skipValue(b, i)
		if vEnd < 0 {
			return false
		}
		f.set(key, b[i:vEnd])
		i = skipWS(b, vEnd)
		if i >= len(b) {
			return false
		}
		switch b[i] {
		case ',':
			i = skipWS(b, i+1)
		case '}':
			return true
		default:
			return false
		}
	}
	return false
}

func (f *rawFields) set(key, v []byte) {
	switch string(key) {
	case "id":
		f.id = v
	case "version":
		f.version = v
	case "type":
		f.typ = v
	case "action":
		f.action = v
	case "sender":
		f.sender = v
	case "target":
		f.target = v
	case "deviceId":
		f.deviceID = v
	case "timestamp":
		f.timestamp = v
	case "payload":
		f.payload = v
	case "replyTo":
		f.replyTo = v
	case "error":
		f.err = v
	}
}

func skipWS(b []byte, i int) int {
	for i < len(b) {
		switch b[i] {
		case ' ', '\t', '\n', '\r':
			i++
		default:
			return i
		}
	}
	return i
}

// skipString returns the index just past the string starting at b[i] == '"',
// or -1 if it does not end.
func skipString(b []byte, i int) int {
	for j := i + 1; j < len(b); j++ {
		switch b[j] {
		case '\\':
			j++
		case '"':
			return j + 1
		}
	}
	return -1
}

// skipValue returns the index just past the JSON value starting at b[i], or
// -1 if there is none.
func skipValue(b []byte, i int) int {
	if i >= len(b) {
		return -1
	}
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for j := i; j < len(b); j++ {
			switch b[j] {
			case '"':
				end := skipString(b, j)
				if end < 0 {
					return -1
				}
				j = end - 1
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return j + 1
				}
			}
		}
		return -1
	default:
		j := i
		for j < len(b) {
			switch b[j] {
			case ',', '}', ']', ' ', '\t', '\n', '\r':
				if j == i {
					return -1
				}
				return j
			}
			j++
		}
		return j
	}
}

// rawString is the value of a JSON string, or "" for any other JSON type
// (a mistyped field reads as absent).
func rawString(v []byte) string {
	if len(v) < 2 || v[0] != '"' {
		return ""
	}
	inner := v[1 : len(v)-1]
	if bytes.IndexByte(inner, '\\') < 0 && utf8.Valid(inner) {
		return string(inner)
	}
	var s string
	if json.Unmarshal(v, &s) != nil {
		return ""
	}
	return s
}

// rawTimestamp reads a timestamp the MDK way: any number but zero is valid
// (JS truthiness), including fractions and out-of-range values, which are
// clamped. Anything else (a string, a boolean, null, 0) reads as 0, invalid.
func rawTimestamp(v []byte) int64 {
	if len(v) == 0 || (v[0] != '-' && (v[0] < '0' || v[0] > '9')) {
		return 0
	}
	if n, err := strconv.ParseInt(string(v), 10, 64); err == nil {
		return n
	}
	f, err := strconv.ParseFloat(string(v), 64)
	if err != nil && !math.IsInf(f, 0) {
		return 0
	}
	switch {
	case f == 0 || math.IsNaN(f):
		return 0
	case f >= math.MaxInt64:
		return math.MaxInt64
	case f <= math.MinInt64:
		return math.MinInt64
	}
	if n := int64(f); n != 0 {
		return n
	}
	return int64(math.Copysign(1, f)) // a truthy fraction such as 0.5
}
