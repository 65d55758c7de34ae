package commands

import (
	"bytes"
	"testing"
)

// FuzzDecodeRecord feeds arbitrary WAL bytes to the record decoder Recover and Status use: it must never
// panic, and whatever it accepts must re-encode stably (encode∘decode is idempotent).
func FuzzDecodeRecord(f *testing.F) {
	f.Add([]byte(`{"commandId":"c1","state":"QUEUED","scope":"device","deviceId":"d1","workerId":"w1","command":"reboot","params":{"a":[1,2]},"requesterId":"r","retries":3,"attempts":0,"deadline":0,"delivered":false,"createdAt":1,"updatedAt":1}`))
	f.Add([]byte(`{"state":"EXECUTING","delivered":true,"children":["a","b"],"result":{ "x" : 1 }}`))
	f.Add([]byte(`{"state":"SUCCESS","result":null,"error":"ERR_X: y"}`))
	f.Add([]byte(`{"state":"NOPE"}`))
	f.Add([]byte(`[]`))
	f.Add([]byte(`{`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r1, err := decode("key", b)
		if err != nil {
			return
		}
		if r1.CommandID == "" {
			t.Fatal("decoded record without id")
		}
		e1, err := encode(&r1)
		if err != nil {
			return // e.g. invalid JSON inside a RawMessage that Unmarshal accepted as a string-free value
		}
		r2, err := decode("key", e1)
		if err != nil {
			t.Fatalf("re-decode of %s: %v", e1, err)
		}
		e2, err := encode(&r2)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(e1, e2) {
			t.Fatalf("unstable encoding:\n%s\n%s", e1, e2)
		}
	})
}
