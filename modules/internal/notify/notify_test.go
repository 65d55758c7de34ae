package notify

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestQueueOrderAndReentry(t *testing.T) {
	var got []int
	var q *Queue[int]
	q = New(func(v int) {
		got = append(got, v)
		if v == 1 { // a value pushed during delivery is delivered by the same loop, after the batch
			q.Push(3)
			q.Flush()
		}
	})
	q.Push(1)
	q.Push(2)
	q.Flush()
	assert.Equal(t, []int{1, 2, 3}, got)

	q.Flush()
	assert.Equal(t, []int{1, 2, 3}, got, "nothing delivered twice")
}

func TestQueueWithoutCallback(t *testing.T) {
	q := New[int](nil)
	q.Push(1)
	q.Flush()
	assert.Empty(t, q.queue)
}
